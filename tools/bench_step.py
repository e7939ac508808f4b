"""Time per RL step, split by phase, for `ppo_clip`, `dppo_binary_tv` and `dppo_topk_tv` (K=20), each with the
π_old recompute (`train.recompute_old_logprobs=always`, the baseline) and without it (`auto`: none of these modes
reads π_old), in one run.

    python tools/bench_step.py [CONFIG.yaml] [--steps 12] [key=value ...]

Every variant starts from the same warm-started policy and sees the same prompts and sampling seeds; steps are
interleaved across variants so machine noise hits all of them alike. Prints medians, the ratio to `ppo_clip` with
the recompute, and each mode's ratio without / with the recompute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import transformers
from rich.console import Console
from rich.table import Table

from nemo_dppo.config import DEFAULT_CONFIG, load_config
from nemo_dppo.trainer import Trainer

MODES = (("ppo_clip", []), ("dppo_binary_tv", []), ("dppo_topk_tv", ["rollout.logprobs_topk=20"]))
RECOMPUTE = ("always", "auto")
PHASES = ("rollout", "logprob", "train", "sync", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=12, help="measured steps per mode (after one warm-up)")
    args, overrides = parser.parse_known_args()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for mode, extra in MODES:
            for recompute in RECOMPUTE:
                name = f"{mode} ({recompute})"
                cfg = load_config(args.config, [*overrides, f"loss.mode={mode}", f"run_dir={tmp}/{mode}-{recompute}",
                                                f"train.recompute_old_logprobs={recompute}", *extra])  # fmt: skip
                trainers[name] = Trainer(cfg)
        times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in trainers}
        for step in range(1, args.steps + 2):
            for name, trainer in trainers.items():
                metrics = trainer.train_one_step(step)
                if step > 1:  # step 1 warms up allocators and caches
                    for phase in PHASES:
                        times[name][phase].append(metrics.get(f"time/{phase}", 0.0))  # no recompute: 0

    median = {m: {p: statistics.median(v) for p, v in phases.items()} for m, phases in times.items()}
    cfg = trainers["ppo_clip (always)"].cfg
    table = Table(
        title=f"RL step time by phase (median of {args.steps} steps; {cfg.train.prompts_per_step}×{cfg.rollout.n} "
        f"samples, {cfg.train.mini_batches} mini-batches)"
    )
    table.add_column("mode")
    for phase in PHASES:
        table.add_column(f"{phase} ms", justify="right")
    table.add_column("step × ppo_clip (always)", justify="right")
    table.add_column("step auto / always", justify="right")
    base = median["ppo_clip (always)"]["step"]
    for name in median:
        row = [f"{median[name][p] * 1e3:.1f}" for p in PHASES]
        mode = name.split(" ")[0]
        own = median[name]["step"] / median[f"{mode} (always)"]["step"]
        table.add_row(name, *row, f"{median[name]['step'] / base:.3f}", f"{own:.3f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
