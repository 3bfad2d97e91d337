"""The policy command line: ``python -m deepeyes_agent.policy build-tiny|pretrain-tiny|export ...``.

``build-tiny`` writes the random tiny Qwen2.5-VL, or with ``--family qwen3_vl`` the random tiny Qwen3-VL (tests,
wiring checks); ``pretrain-tiny`` writes the tiny base
pretrained on synthetic perception (the zoom run starts from it); ``--cache`` builds it into the settings-hashed
cache instead (a second call is a cache hit) and prints where. ``export SOURCE OUT`` writes a run's (or one
checkpoint's) policy as a Hugging Face model directory (``deepeyes_agent.policy.export``).
"""

from __future__ import annotations

import argparse
import sys
import time

from deepeyes_agent.policy.pretrain import PretrainSettings, build_pretrained_tiny, pretrained_tiny_base
from deepeyes_agent.policy.tiny import TINY_FAMILIES

FAMILY_NAMES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.policy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny", help="a random tiny Qwen2.5-VL or Qwen3-VL used by tests and wiring checks")
    build.add_argument("out_dir")
    build.add_argument("--family", choices=sorted(TINY_FAMILIES), default="qwen2_5_vl")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--min-pixels", type=int, help="the image processor's budget (default: 4 image tokens)")
    build.add_argument("--max-pixels", type=int, help="the image processor's budget (default: 64 image tokens)")
    pretrain = sub.add_parser("pretrain-tiny", help="the tiny base pretrained on synthetic perception (minutes)")
    pretrain.add_argument("out_dir", nargs="?", help="where to write it (default: the cache, see --cache)")
    pretrain.add_argument("--cache", action="store_true", help="build into the settings-hashed cache")
    pretrain.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="a run's newest checkpoint, or any checkpoint, as a Hugging Face model dir")
    export.add_argument("source", help="a run directory (its newest checkpoint) or a checkpoint (checkpoints/iter_N)")
    export.add_argument("out_dir")
    export.add_argument("--base", help="the model training started from (default: model.path of the run's config)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command == "export":
        from deepeyes_agent.policy.export import PolicySourceError, export_policy

        try:
            print(export_policy(args.source, args.out_dir, base=args.base).summary())
        except (PolicySourceError, FileNotFoundError) as exc:
            print(f"export: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "build-tiny":
        budget = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
        out = TINY_FAMILIES[args.family](args.out_dir, seed=args.seed, **budget)
        print(f"built tiny {FAMILY_NAMES[args.family]} in {out} ({time.perf_counter() - start:.1f} s)")
        return 0
    settings = PretrainSettings(seed=args.seed)
    if args.cache or not args.out_dir:
        out = pretrained_tiny_base(settings)
    else:
        out = build_pretrained_tiny(args.out_dir, settings)
    print(f"pretrained tiny base in {out} ({time.perf_counter() - start:.1f} s); model card: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
