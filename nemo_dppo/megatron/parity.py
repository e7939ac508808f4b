"""Parity check: one DPPO step on the Megatron engine against the `hf` engine, with identical weights and batch.

    python -m nemo_dppo.launch ... (or any launcher)  python -m nemo_dppo.megatron.parity --rollout-dir A \\
        --train-dir B --tp 2 --ep 2 --dp 2 --out parity.json

Every rank builds the Megatron engine on the HF directory B; rank 0 also builds the `hf` engine on B and samples
a rollout batch (fp32, Top-K ids, routes) with the policy in directory A, so when B is A with perturbed routers
the rollout's routes differ from the trainers' own and R3 is really exercised. Rank 0 writes a JSON report with
the largest differences between the engines in: log π_old, π at the Top-K ids, the entropy (R3 off and on), one
training step's loss and gradient norm (R3 on), and log π after that step; plus the routing disagreements
(experts used vs recorded, own vs recorded) and the router weights' gradient norm on the Megatron side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nemo_dppo.megatron.parity", description=__doc__.split("\n")[0])
    parser.add_argument("--rollout-dir", required=True, help="HF directory of the rollout policy (μ)")
    parser.add_argument("--train-dir", required=True, help="HF directory both training engines start from")
    parser.add_argument("--out", required=True, help="JSON report (written by rank 0)")
    for name in ("tp", "ep", "etp", "pp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--dp", type=int, default=None)
    parser.add_argument("--dispatcher", default="alltoall", help="train.megatron.moe_dispatcher")
    parser.add_argument("--mode", default="dppo_topk_tv", help="loss.mode of the training step")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="rollout.n")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_policy_dirs(root: str | Path, *, hidden_size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE (2 KV heads so that tp=2 divides them) in `root/rollout` and the same model with
    perturbed routers in `root/train` (the trainers then route differently from the rollout)."""
    from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, save_model_dir
    from nemo_dppo.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    cfg = TinyMoEConfig(hidden_size=hidden_size, num_heads=2, num_kv_heads=2, initializer_range=0.1, seed=seed)
    model = build_tiny_qwen3_moe(cfg, tokenizer)
    rollout_dir, train_dir = Path(root) / "rollout", Path(root) / "train"
    save_model_dir(model, tokenizer, str(rollout_dir))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(torch.randn(param.shape, generator=generator) * param.std())
    save_model_dir(model, tokenizer, str(train_dir))
    return rollout_dir, train_dir


def rollout_batch(rollout_dir: str | Path, *, prompts: int = 4, samples: int = 2, topk: int = 5, seed: int = 0) -> Any:
    """An fp32 rollout of the arithmetic task with Top-K ids and routes, and ±1 advantages (seeded)."""
    from nemo_dppo.batching import collate_rollouts
    from nemo_dppo.engines.base import SamplingParams
    from nemo_dppo.engines.hf_rollout import HFRolloutEngine
    from nemo_dppo.tasks.arithmetic import ArithmeticTask

    engine = HFRolloutEngine(str(rollout_dir), dtype="fp32")
    problems = ArithmeticTask(num_digits=2, seed=seed).all_problems("train")[:prompts]
    prompt_ids = [engine.tokenizer.encode(p.prompt) for p in problems]
    params = SamplingParams(n=samples, max_new_tokens=6, seed=seed, logprobs_topk=topk, record_routes=True)
    groups = engine.generate(prompt_ids, params)
    flat = [s for group in groups for s in group]
    group_ids = [g for g, group in enumerate(groups) for _ in group]
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randint(0, 2, (len(flat),), generator=generator).float() * 2 - 1
    return collate_rollouts(flat, group_ids, advantages.tolist(), advantages, engine.pad_id)


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None, mask: torch.Tensor | None = None) -> float:
    if a is None or b is None:
        return float("nan")
    diff = (a.double() - b.double()).abs()
    if mask is not None:
        diff = diff[mask]
    return float(diff.max()) if diff.numel() else 0.0


def _router_grad_norm(engine: Any) -> float:
    total = 0.0
    for name, param in engine.model.named_parameters():
        grad = getattr(param, "main_grad", None)
        if "router" in name and grad is not None:
            total += float(grad.double().pow(2).sum())
    return math.sqrt(total)


def _compare_forwards(engine: Any, reference: Any, batch: Any, report: dict[str, Any]) -> Any:
    """log π, Top-K, entropy and routing of both engines, without and with R3; returns the last Megatron forward."""
    mask = batch.response_mask
    for r3 in (False, True):
        engine.router_replay = r3
        mine = engine.compute_logprobs(batch)
        tag = "r3" if r3 else "no_r3"
        report[f"routing_used_disagreement_{tag}"] = mine.used_disagreement
        report[f"routing_own_disagreement_{tag}"] = mine.own_disagreement
        if reference is not None:
            reference.router_replay = r3
            theirs = reference.compute_logprobs(batch)
            report[f"logprobs_{tag}"] = _max_diff(mine.token.logprobs, theirs.token.logprobs, mask)
            report[f"topk_logprobs_{tag}"] = _max_diff(mine.token.topk_logprobs, theirs.token.topk_logprobs, mask)
            report[f"entropy_{tag}"] = _max_diff(mine.token.entropy, theirs.token.entropy, mask)
            report[f"hf_used_disagreement_{tag}"] = theirs.used_disagreement
    return mine


def _compare_steps(engine: Any, reference: Any, batch: Any, loss_cfg: Any, report: dict[str, Any]) -> None:
    """One optimizer step on each engine: loss, gradient norm, and log π after the step."""
    mask = batch.response_mask
    metrics = engine.train_step(batch, loss_cfg).metrics
    report["router_grad_norm"] = _router_grad_norm(engine)
    report["megatron_loss"], report["megatron_grad_norm"] = metrics["loss"], metrics["grad_norm"]
    plain = replace(batch, topk_ids=None, topk_rollout_logprobs=None)  # log π only
    after = engine.compute_logprobs(plain)
    if reference is None:
        return
    theirs = reference.train_step(batch, loss_cfg).metrics
    report["hf_loss"], report["hf_grad_norm"] = theirs["loss"], theirs["grad_norm"]
    report["loss"] = abs(metrics["loss"] - theirs["loss"])
    report["grad_norm"] = abs(metrics["grad_norm"] - theirs["grad_norm"])
    theirs_after = reference.compute_logprobs(plain)
    report["logprobs_after_step"] = _max_diff(after.token.logprobs, theirs_after.token.logprobs, mask)
    report["logprobs_moved"] = _max_diff(after.token.logprobs, batch.old_logprobs, mask)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch.distributed as dist

    from nemo_dppo.config import MegatronConfig, TrainConfig
    from nemo_dppo.engines.megatron_training import MegatronTrainingEngine
    from nemo_dppo.losses import LossConfig
    from nemo_dppo.megatron import parallel

    torch.manual_seed(args.seed)
    layout = MegatronConfig(
        tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp, dp=args.dp, moe_dispatcher=args.dispatcher
    )
    train_cfg = TrainConfig(
        backend="megatron", lr=args.lr, megatron=layout, micro_batch_size=args.micro_batch_size, mini_batches=1
    )
    loss_cfg = LossConfig(mode=args.mode)
    engine = MegatronTrainingEngine(args.train_dir, train_cfg, router_replay=False, seed=args.seed)
    rank0 = dist.get_rank() == 0
    batch_args = {"prompts": args.prompts, "samples": args.samples, "topk": args.topk, "seed": args.seed}
    box = [rollout_batch(args.rollout_dir, **batch_args) if rank0 else None]
    dist.broadcast_object_list(box, src=0)
    batch = box[0]

    reference = None
    if rank0:
        from nemo_dppo.engines.hf_training import HFTrainingEngine
        from nemo_dppo.models.tiny_moe import load_model_dir

        hf_model, _ = load_model_dir(args.train_dir, "fp32")
        train_hf = TrainConfig(backend="hf", lr=args.lr, micro_batch_size=args.micro_batch_size, mini_batches=1)
        reference = HFTrainingEngine(hf_model, train_hf, router_replay=False)

    report: dict[str, Any] = {"layout": {"tp": args.tp, "ep": args.ep, "etp": args.etp, "pp": args.pp,
                                         "dp": layout.data_parallel_size, "world": layout.world_size}}  # fmt: skip
    mine = _compare_forwards(engine, reference, batch, report)
    _compare_steps(engine, reference, replace(batch, old_logprobs=mine.token.logprobs), loss_cfg, report)
    if reference is not None:
        Path(args.out).write_text(json.dumps(report, indent=2))
    dist.barrier()
    parallel.shutdown()
    return report if rank0 else None


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run(_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
