"""Time per RL step, split by phase, for `ppo_clip`, `dppo_binary_tv` and `dppo_topk_tv` (K=20) in one run.

    python tools/bench_step.py [CONFIG.yaml] [--steps 12] [key=value ...]

Every mode starts from the same warm-started policy and sees the same prompts and sampling seeds; steps are
interleaved across modes so machine noise hits all of them alike. Prints medians and the ratio to `ppo_clip`
(targets: binary DPPO ≤ 1.05 ×, Top-K ≤ 1.2 ×).
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
            cfg = load_config(args.config, [*overrides, f"loss.mode={mode}", f"run_dir={tmp}/{mode}", *extra])
            trainers[mode] = Trainer(cfg)
        times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m, _ in MODES}
        for step in range(1, args.steps + 2):
            for mode, trainer in trainers.items():
                metrics = trainer.train_one_step(step)
                if step > 1:  # step 1 warms up allocators and caches
                    for phase in PHASES:
                        times[mode][phase].append(metrics[f"time/{phase}"])

    median = {m: {p: statistics.median(v) for p, v in phases.items()} for m, phases in times.items()}
    cfg = trainers["ppo_clip"].cfg
    table = Table(
        title=f"RL step time by phase (median of {args.steps} steps; {cfg.train.prompts_per_step}×{cfg.rollout.n} "
        f"samples, {cfg.train.mini_batches} mini-batches)"
    )
    table.add_column("mode")
    for phase in PHASES:
        table.add_column(f"{phase} ms", justify="right")
    table.add_column("step × ppo_clip", justify="right")
    for mode in median:
        row = [f"{median[mode][p] * 1e3:.1f}" for p in PHASES]
        table.add_row(mode, *row, f"{median[mode]['step'] / median['ppo_clip']['step']:.3f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
