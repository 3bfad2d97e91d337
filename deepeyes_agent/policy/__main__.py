"""The tiny model's command line: ``python -m deepeyes_agent.policy build-tiny|pretrain-tiny OUT_DIR``.

``build-tiny`` writes the random tiny Qwen2.5-VL (tests, wiring checks); ``pretrain-tiny`` writes the tiny base
pretrained on synthetic perception (the zoom run starts from it); ``--cache`` builds it into the settings-hashed
cache instead (a second call is a cache hit) and prints where.
"""

from __future__ import annotations

import argparse
import sys
import time

from deepeyes_agent.policy.pretrain import PretrainSettings, build_pretrained_tiny, pretrained_tiny_base
from deepeyes_agent.policy.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_qwen2_5_vl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.policy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny", help="the random tiny Qwen2.5-VL used by tests and wiring checks")
    build.add_argument("out_dir")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--min-pixels", type=int, default=TINY_MIN_PIXELS)
    build.add_argument("--max-pixels", type=int, default=TINY_MAX_PIXELS)
    pretrain = sub.add_parser("pretrain-tiny", help="the tiny base pretrained on synthetic perception (minutes)")
    pretrain.add_argument("out_dir", nargs="?", help="where to write it (default: the cache, see --cache)")
    pretrain.add_argument("--cache", action="store_true", help="build into the settings-hashed cache")
    pretrain.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command == "build-tiny":
        out = build_tiny_qwen2_5_vl(args.out_dir, seed=args.seed, min_pixels=args.min_pixels,
                                    max_pixels=args.max_pixels)
        print(f"built tiny Qwen2.5-VL in {out} ({time.perf_counter() - start:.1f} s)")
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
