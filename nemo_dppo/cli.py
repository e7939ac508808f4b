"""The `nemo-dppo` command: `train`, `plot`, `demo`.

User errors (bad config, missing paths) print one `error:` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nemo_dppo.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-dppo", description="DPPO for LLM reinforcement learning")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run RL training (default config: conf/tiny_cpu.yaml)")
    train.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")

    plot = sub.add_parser("plot", help="overlay the metrics of one or more run directories")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", default=None, help="output directory (default: the first run's plots/)")

    sub.add_parser("demo", help="the paper's two examples through PPO and DPPO masks")
    return parser


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` → (config path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from nemo_dppo.demo import run_demo

            run_demo()
        elif args.command == "train":
            from nemo_dppo.config import DEFAULT_CONFIG, load_config
            from nemo_dppo.trainer import train

            path, overrides = split_config_args(args.args)
            train(load_config(path or DEFAULT_CONFIG, overrides))
        elif args.command == "plot":
            from nemo_dppo.plots import plot_runs

            plot_runs(args.run_dirs, args.out)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
