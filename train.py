"""Train a Qwen-VL policy to think with images: ``python train.py --config configs/NAME.yaml [key=value ...]``.

With no arguments it runs ``configs/zoom_cpu.yaml``: a tiny model pretrained offline on synthetic perception
learns by RL, on two CPU cores in minutes, to call the zoom tool on the detail it cannot read, and to be right
because of it; the same run with the tool disabled follows as the control. ``--address`` joins an existing Ray cluster
(``ray start --head`` ...) instead of starting a local one. Rerunning the same command resumes from the
newest checkpoint in the run directory. ``--describe`` lists every setting. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "zoom_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file (default: zoom_cpu)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    parser.add_argument("--describe", action="store_true", help="print every setting with its default and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. rollout.temperature=0.7")
    args = parser.parse_args(argv)

    from deepeyes_agent.training.config import ConfigError, describe, load_config

    if args.describe:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2
    from deepeyes_agent.training.driver import train
    from deepeyes_agent.training.rllib.algorithm import BadDataError

    try:
        result = train(cfg, address=args.address)
    except BadDataError as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    first, last = result.get("first_eval") or {}, result.get("last_eval") or {}
    nan = float("nan")
    if last:
        print(f"held-out accuracy {first.get('acc', nan):.3f} -> {last.get('acc', nan):.3f}, "
              f"tool-call rate {first.get('tool_call_rate', nan):.3f} -> {last.get('tool_call_rate', nan):.3f}")
    control = (result.get("control") or {}).get("last_eval") or {}
    if control:
        print(f"control, tools disabled: held-out accuracy {control.get('acc', nan):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
