"""Forward + backward time of the policy loss, DPPO modes vs `ppo_clip`, on the same tensors in one run.

    python tools/bench_loss.py [--batch 256] [--tokens 8192] [--repeats 7] [--topk 20]

Prints a table: median time per mode and its ratio to `ppo_clip` (target: DPPO ≤ 1.05 ×).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from nemo_dppo.losses import LossConfig, PolicyLossInput, compute_policy_loss


def make_inputs(batch: int, tokens: int, topk: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    log_mu = -torch.rand(batch, tokens, generator=g).pow(3) * 6  # mostly confident tokens, a tail of rare ones
    log_pi = (log_mu + torch.randn(batch, tokens, generator=g) * 0.05).clamp(max=0)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g)
    inputs = {
        "logprobs": log_pi,
        "rollout_logprobs": log_mu,
        "advantages": torch.randn(batch, generator=g),
        "mask": torch.arange(tokens)[None] < lengths[:, None],
    }
    if topk:
        tail = -torch.rand(batch, tokens, topk - 1, generator=g) * 4 - 3
        inputs["topk_rollout_logprobs"] = torch.cat([log_mu[..., None], tail], -1)
        inputs["topk_train_logprobs"] = torch.cat([log_pi[..., None], tail + 0.01], -1)
    return inputs


def time_mode(mode: str, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    cfg = LossConfig(mode=mode)
    extra = {k: inputs[k] for k in ("topk_rollout_logprobs", "topk_train_logprobs")} if "topk" in mode else {}
    times = []
    for i in range(repeats + 1):
        logprobs = inputs["logprobs"].clone().requires_grad_(True)
        start = time.perf_counter()
        batch = PolicyLossInput(logprobs, inputs["rollout_logprobs"], inputs["advantages"], inputs["mask"], **extra)
        loss, _ = compute_policy_loss(batch, cfg)
        loss.backward()
        if i:  # the first call warms up allocators
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--topk", type=int, default=20, help="K for the Top-K rows (0 skips them)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each times every mode once, in a new order")
    args = parser.parse_args()

    inputs = make_inputs(args.batch, args.tokens, args.topk)
    modes = ["ppo_clip", "dppo_binary_tv", "dppo_binary_kl"]
    if args.topk:
        modes += ["dppo_topk_tv", "dppo_topk_kl"]
    # Every round times each mode once, in a shuffled order; ratios are taken within a round (adjacent runs),
    # which cancels most of the drift of a shared machine, then the median over rounds is reported.
    results: dict[str, list[float]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    order = random.Random(0)
    for _ in range(args.rounds):
        this_round = {}
        for mode in order.sample(modes, len(modes)):
            this_round[mode] = time_mode(mode, inputs, args.repeats)
            results[mode].append(this_round[mode])
        for mode in modes:
            ratios[mode].append(this_round[mode] / this_round["ppo_clip"])
    median = {m: statistics.median(v) for m, v in results.items()}

    table = Table(title=f"policy loss fwd+bwd, {args.batch} × {args.tokens} tokens, {torch.get_num_threads()} threads")
    table.add_column("mode")
    table.add_column("ms", justify="right")
    table.add_column("× ppo_clip (median of per-round ratios)", justify="right")
    for mode in modes:
        table.add_row(mode, f"{median[mode] * 1e3:.1f}", f"{statistics.median(ratios[mode]):.3f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
