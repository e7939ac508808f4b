"""The two engine protocols every backend implements (hf, vllm, megatron).

A rollout engine samples responses and reports, per sampled token, the behaviour policy μ that produced it
(the DPPO anchor, spec "Anchor"), the rollout's Top-K set (Eqs. 15-16) and the MoE routes it took (R3).
A training engine computes π on those tokens and takes optimizer steps with a loss from `nemo_dppo.losses`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What the rollout engine is asked for. `logprobs_topk` = K (0: only the sampled token's log μ)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    logprobs_topk: int = 0
    record_routes: bool = False
    greedy: bool = False


@dataclass
class RolloutSample:
    """One sampled response.

    Shapes (T = number of generated tokens, P = prompt length, K = `logprobs_topk`, L = MoE layers, k = top-k):
      prompt_ids      [P]  int64
      response_ids    [T]  int64   (includes the EOS token when one was produced)
      logprobs        [T]  fp32    log μ(a_t | s_t), after temperature / top-p ("processed" log-probs)
      topk_ids        [T, K] int64 the K most likely ids under μ; the sampled id is swapped into slot K-1
                                   when it is not among them (spec, Top-K), so it is always in the set
      topk_logprobs   [T, K] fp32  log μ at `topk_ids`
      routed_experts  [P + T - 1, L, k] int64  experts the rollout router chose for every forwarded token
                                   (the last token is never forwarded; the trainer pads that row)
    """

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    finished: bool = True  # False when cut by max_new_tokens


@dataclass
class ForwardResult:
    """Per-token results of one training-engine forward, in target coordinates [N, S − 1].

    `used_disagreement` / `own_disagreement`: fractions of valid token-layer routes whose experts differ from the
    rollout's — the experts this forward used (0 under R3) and those the training router itself would pick.
    """

    token: Any  # nemo_dppo.logprobs.TokenLogprobs: logprobs, topk_logprobs, entropy
    used_disagreement: float | None = None
    own_disagreement: float | None = None


@dataclass
class TrainStepResult:
    """One optimizer step: its loss metrics, and the forward it took *before* its update (detached).

    For the first mini-batch of a rollout step that forward is exactly π_old on its tokens, which is how the
    trainer measures the on-policy mismatch without recomputing π_old (`train.recompute_old_logprobs`).
    """

    metrics: dict[str, float]
    forward: ForwardResult


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses with the behaviour policy μ."""

    pad_id: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[RolloutSample]]:
        """For each prompt, `params.n` samples (outer list: prompts, inner: samples)."""
        ...

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's current weights (names as in the HF checkpoint)."""
        ...

    def close(self) -> None:
        """Free the engine (vLLM: its engine core and process group)."""
        ...


@runtime_checkable
class TrainingEngine(Protocol):
    """Holds the policy π being optimised; every rank of a multi-rank job calls every method alike."""

    is_moe: bool

    def compute_logprobs(self, batch: Any) -> ForwardResult:
        """Forward without gradient over a `RolloutBatch`: log π, entropy, routing disagreement, and π at the
        batch's Top-K ids when it carries them."""
        ...

    def train_step(self, minibatch: Any, loss_cfg: Any) -> TrainStepResult:
        """One optimizer step on one mini-batch with the policy loss of `loss_cfg`."""
        ...

    def hf_state_dict(self) -> Mapping[str, torch.Tensor]:
        """Weights with HF names, for the rollout engine's weight sync and for HF checkpoints."""
        ...

    def save_checkpoint(self, manager: Any, state: Any, tokenizer: Any, config_yaml: str) -> Any:
        """Publish this engine's part of a checkpoint (`manager` is None off the main rank); returns its path."""
        ...

    def load_checkpoint(self, checkpoint: Path, payload: Mapping[str, Any]) -> None:
        """Restore the engine's optimizer (and shards) from a checkpoint and its loaded trainer payload."""
        ...
