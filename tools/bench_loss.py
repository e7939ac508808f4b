"""Forward + backward time of the policy loss, each mode against `ppo_clip` on the same tensors, in one run.

    python tools/bench_loss.py [--sizes 64x8192,256x8192] [--rounds 15] [--repeats 3] [--compile off,on] [--topk 0]
                               [--threads N] [--clock wall|cpu]

Robust to a shared machine: every round times every mode once (each `--repeats` calls, the median kept), in a new
shuffled order, and the ratio to `ppo_clip` is taken within the round (adjacent runs share the machine's load);
the table shows the median of those per-round ratios with its IQR and min–max. `--compile on` rows measure
`loss.compile=on` for every mode, `ppo_clip` included (ratios are within the same setting). Uses the torch threads
it gets unless `--threads`; the load average before and after is printed because wall time means little on a busy
machine. `--clock cpu` times this process's CPU seconds instead: with one thread, the work done, whatever the load
(with more, OpenMP's spinning at barriers is counted too).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from nemo_dppo.losses import LossConfig, PolicyLossInput, compute_policy_loss

MODES = ("ppo_clip", "dppo_binary_tv", "dppo_binary_kl")
TOPK_MODES = ("dppo_topk_tv", "dppo_topk_kl")


def make_inputs(batch: int, tokens: int, topk: int, seed: int = 0) -> PolicyLossInput:
    """Mostly confident tokens with a tail of rare ones; π close to μ; random response lengths."""
    g = torch.Generator().manual_seed(seed)
    log_mu = -torch.rand(batch, tokens, generator=g).pow(3) * 6
    log_pi = (log_mu + torch.randn(batch, tokens, generator=g) * 0.05).clamp(max=0)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g)
    inputs = PolicyLossInput(
        log_pi, log_mu, torch.randn(batch, generator=g), torch.arange(tokens)[None] < lengths[:, None]
    )
    if topk:
        tail = -torch.rand(batch, tokens, topk - 1, generator=g) * 4 - 3
        inputs.topk_rollout_logprobs = torch.cat([log_mu[..., None], tail], -1)
        inputs.topk_train_logprobs = torch.cat([log_pi[..., None], tail + 0.01], -1)
    return inputs


CLOCK = time.perf_counter


def time_once(inputs: PolicyLossInput, cfg: LossConfig, repeats: int) -> float:
    """Median seconds of `repeats` forward + backward calls."""
    times = []
    for _ in range(repeats):
        logprobs = inputs.logprobs.clone().requires_grad_(True)
        start = CLOCK()
        loss, _ = compute_policy_loss(PolicyLossInput(**{**vars(inputs), "logprobs": logprobs}), cfg)
        loss.backward()
        times.append(CLOCK() - start)
    return statistics.median(times)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bench_size(batch: int, tokens: int, args: argparse.Namespace) -> list[tuple[str, ...]]:
    inputs = make_inputs(batch, tokens, args.topk)
    modes = list(MODES) + (list(TOPK_MODES) if args.topk else [])
    settings = [(mode, setting) for setting in args.compile for mode in modes]
    configs = {key: LossConfig(mode=key[0], compile=key[1]) for key in settings}
    for key in settings:  # warm up allocators and compile every variant before any timing
        time_once(inputs, configs[key], 2)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in settings}
    ratios: dict[tuple[str, str], list[float]] = {key: [] for key in settings}
    order = random.Random(0)
    for _ in range(args.rounds):
        this_round = {
            key: time_once(inputs, configs[key], args.repeats) for key in order.sample(settings, len(settings))
        }
        for key, seconds in this_round.items():
            times[key].append(seconds)
            ratios[key].append(seconds / this_round[("ppo_clip", key[1])])
    rows = []
    for key in settings:
        q1, median, q3 = quartiles(ratios[key])
        rows.append((
            f"{batch} × {tokens}", key[0], key[1], f"{statistics.median(times[key]) * 1e3:.1f}",
            f"{median:.3f}", f"{q1:.3f}–{q3:.3f}", f"{min(ratios[key]):.3f}–{max(ratios[key]):.3f}",
        ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x8192,256x8192", help="comma-separated BxT token grids")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (≥ 15 for a stable median)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per mode per round; the median is kept")
    parser.add_argument("--compile", default="off,on", help="loss.compile settings to measure: off, on, auto")
    parser.add_argument("--topk", type=int, default=0, help="K for Top-K rows (0 skips them)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: what torch gets)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    args = parser.parse_args()
    args.compile = args.compile.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    rows = [row for size in args.sizes.split(",") for row in bench_size(*map(int, size.split("x")), args)]
    title = (
        f"policy loss fwd+bwd vs ppo_clip: {args.rounds} interleaved rounds × {args.repeats} calls, "
        f"{torch.get_num_threads()} torch threads, {args.clock} clock, load average {load_before:.2f} → "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    table = Table(title=title)
    for column in ("tokens", "mode", "compile", "ms (median)", "× ppo_clip (median)", "IQR", "min–max"):
        table.add_column(column, justify="left" if column in ("tokens", "mode", "compile") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
