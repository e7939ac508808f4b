"""What a step's tokens say beyond the loss: the on-policy training–inference mismatch, and which tokens the trust
region dropped — the paper's Figure 6 (μ and entropy of clipped tokens) and Appendix E (the most clipped tokens).

The on-policy mismatch compares log π before any update with log μ on the same weights: from the π_old recompute
when it runs, else from the first mini-batch's forward, which runs before the first update (so it is π_old on
that mini-batch's tokens).

A token is *dropped* when it is a response token whose mask M_t (Eq. 12, or the baseline's mask) is 0 in the
mini-batch update that used it; modes without a mask (PG-IS, CISPO) drop nothing. The decision is recomputed from
the very log-probs the update's forward produced, so it is the one the loss applied.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_dppo.batching import RolloutBatch
from nemo_dppo.engines.base import ForwardResult
from nemo_dppo.losses import LossConfig, PolicyLossInput, TokenView, get_mode, mismatch_metrics

DROPPED_TOKENS_FILE = "dropped_tokens.jsonl"


def on_policy_metrics(batch: RolloutBatch, forward: ForwardResult) -> dict[str, float]:
    """Mismatch k1 / k3 / |π − μ|, the policy's entropy and the MoE routing disagreement over `batch`'s response
    tokens, from a forward taken before any update."""
    mask = batch.response_mask
    m = mismatch_metrics(forward.token.logprobs, batch.rollout_logprobs, mask)
    metrics = {
        "mismatch/kl_k1": m["mismatch_kl_k1"],
        "mismatch/kl_k3": m["mismatch_kl_k3"],
        "mismatch/abs_prob_diff_mean": m["abs_prob_diff_mean"],
        "mismatch/abs_prob_diff_max": m["abs_prob_diff_max"],
        "entropy/mean": float(forward.token.entropy[mask].mean()) if mask.any() else 0.0,
    }
    if forward.used_disagreement is not None:
        metrics["routing/disagreement"] = forward.used_disagreement  # experts used in training vs rollout
        metrics["routing/own_disagreement"] = forward.own_disagreement  # training router's own pick vs rollout
    return metrics


def count_dropped(dropped: DroppedTokens, mb: RolloutBatch, forward: ForwardResult, cfg: LossConfig) -> None:
    """Add the tokens of mini-batch `mb` that its update (whose forward is `forward`) dropped."""
    token = forward.token
    inputs = PolicyLossInput(
        logprobs=token.logprobs,
        rollout_logprobs=mb.rollout_logprobs,
        advantages=mb.advantages,
        response_mask=mb.response_mask,
        old_logprobs=mb.old_logprobs,
        topk_rollout_logprobs=mb.topk_rollout_logprobs,
        topk_train_logprobs=token.topk_logprobs,
    )
    dropped.add(dropped_mask(inputs, cfg), mb.response_mask, mb.rollout_logprobs, token.entropy, mb.target_ids)


def dropped_mask(inputs: PolicyLossInput, cfg: LossConfig) -> torch.Tensor:
    """[B, T] bool: response tokens whose mask M is 0 under `cfg.mode` for these inputs."""
    view = TokenView.of(inputs, cfg)
    region = get_mode(cfg.mode).fn(view)
    return view.valid & ~region.keep


@dataclass
class DroppedTokens:
    """One rollout step's dropped tokens, accumulated over its mini-batches."""

    count: int = 0
    total: int = 0
    mu_sum: float = 0.0
    entropy_sum: float = 0.0
    ids: Counter = field(default_factory=Counter)

    def add(self, dropped: torch.Tensor, valid: torch.Tensor, rollout_logprobs: torch.Tensor,
            entropy: torch.Tensor | None, target_ids: torch.Tensor) -> None:  # fmt: skip
        self.count += int(dropped.sum())
        self.total += int(valid.sum())
        self.mu_sum += float(rollout_logprobs[dropped].double().exp().sum())
        if entropy is not None:
            self.entropy_sum += float(entropy[dropped].double().sum())
        self.ids.update(target_ids[dropped].tolist())

    def metrics(self) -> dict[str, float]:
        """`dropped/frac`, and the mean μ and entropy of the dropped tokens (NaN when none was dropped)."""
        none = float("nan")
        return {
            "dropped/frac": self.count / max(self.total, 1),
            "dropped/mu_mean": self.mu_sum / self.count if self.count else none,
            "dropped/entropy_mean": self.entropy_sum / self.count if self.count else none,
        }


class DroppedTokenLog:
    """`RUN_DIR/dropped_tokens.jsonl`: one line per step {step, counts by decoded token}; a resume drops the
    lines past the step it restarts from, so the log always matches the metrics."""

    def __init__(self, run_dir: Path, resume_from_step: int) -> None:
        self.path = run_dir / DROPPED_TOKENS_FILE
        kept = [r for r in read_dropped_tokens(run_dir) if 0 <= r["step"] <= resume_from_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def log(self, step: int, counts: dict[str, int]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "counts": counts}) + "\n")


def read_dropped_tokens(run_dir: Path) -> list[dict]:
    """Complete records of the log (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / DROPPED_TOKENS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def most_dropped(run_dir: Path, n: int = 10) -> list[tuple[str, int]]:
    """The `n` most frequently dropped tokens of a run, decoded, with their counts."""
    total: Counter = Counter()
    for record in read_dropped_tokens(run_dir):
        total.update(record["counts"])
    return total.most_common(n)
