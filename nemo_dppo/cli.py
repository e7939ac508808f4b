"""The `nemo-dppo` command: `train`, `reproduce`, `eval`, `plot`, `demo`.

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

    rep = sub.add_parser("reproduce", help="the paper's experiments (Figs. 3-7, App. G.2) on the sanity task")
    rep.add_argument("experiments", nargs="*", metavar="EXPERIMENT|key=value",
                     help="stability, anchor, bad_updates, relax, topk (default: all); key=value overrides "
                          "apply to every run")  # fmt: skip
    rep.add_argument("--seeds", type=int, default=3, help="seeds per method and learning rate (default: 3)")
    rep.add_argument("--jobs", type=int, default=None, help="runs side by side (default: the number of cores)")
    rep.add_argument("--quick", action="store_true", help="4 steps, 1 seed, 1 learning rate: the machinery only")
    rep.add_argument("--out", default=None, help="output directory (default: runs/reproduce, or runs/reproduce_quick)")

    plot = sub.add_parser("plot", help="overlay the metrics of one or more run directories")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", default=None, help="output directory (default: the first run's plots/)")

    sub.add_parser("demo", help="the paper's two examples through PPO and DPPO masks")

    ev = sub.add_parser("eval", help="avg@k / pass@k of a checkpoint on a prompt file (e.g. AIME 2024)")
    ev.add_argument("checkpoint", help="HF model dir, run checkpoint RUN_DIR/checkpoints/step_N, or run dir (latest)")
    ev.add_argument("--data", required=True, help="prompt file (tools/prepare_data.py output, or a raw AIME file)")
    ev.add_argument("--k", type=int, default=32, help="samples per problem (default: 32)")
    ev.add_argument("--max-new-tokens", type=int, default=4096, help="response budget (default: 4096)")
    ev.add_argument("--temperature", type=float, default=1.0, help="default: 1.0 (the paper)")
    ev.add_argument("--top-p", type=float, default=1.0, help="default: 1.0 (the paper)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per engine call, k samples each (default: 8)")
    ev.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ev.add_argument("--engine", default="hf", help="rollout engine (default: hf)")
    ev.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    ev.add_argument("--limit", type=int, default=None, help="only the first N problems")
    ev.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval/STEP-DATA-kK)")
    ev.add_argument("--save-responses", action="store_true", help="also write every sample to responses.jsonl")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        elif args.command == "eval":
            from nemo_dppo.evaluate import run_eval

            result = run_eval(
                args.checkpoint,
                args.data,
                k=args.k,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                batch_size=args.batch_size,
                dtype=args.dtype,
                engine=args.engine,
                chat_template=args.chat_template,
                limit=args.limit,
                out_dir=args.out,
                save_responses=args.save_responses,
                progress=not args.no_progress,
            )
            print(result.summary())
        elif args.command == "reproduce":
            from pathlib import Path

            from nemo_dppo.reproduce.command import check_args, reproduce

            check_args(args.seeds, args.jobs)
            names = [a for a in args.experiments if "=" not in a]
            overrides = [a for a in args.experiments if "=" in a]
            out = Path(args.out or ("runs/reproduce_quick" if args.quick else "runs/reproduce"))
            try:
                reproduce(names, args.seeds, args.jobs, args.quick, out, overrides)
            except ValueError as err:  # an unknown experiment name
                raise UserError(str(err)) from None
        elif args.command == "plot":
            from nemo_dppo.plots import plot_runs

            plot_runs(args.run_dirs, args.out)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
