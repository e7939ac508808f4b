"""Training engine on a plain HF causal LM: log π, the policy loss, AdamW with grad clipping; R3 replay.

Every forward over a batch replays the rollout's routes when `router_replay` is on (the router still computes
logits and gets gradients), and otherwise records the training router's own choice, so the routing
disagreement with the rollout is measured either way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_dppo.batching import RolloutBatch
from nemo_dppo.checkpoint import CheckpointManager, TrainerState
from nemo_dppo.config import Config, TrainConfig
from nemo_dppo.distributed.vocab_parallel import vocab_parallel_logprobs
from nemo_dppo.engines.base import ForwardResult, TrainStepResult
from nemo_dppo.errors import TrainingDiverged, UserError
from nemo_dppo.logprobs import TokenLogprobs
from nemo_dppo.losses import LossConfig, PolicyLossInput, compute_policy_loss
from nemo_dppo.models.tiny_moe import load_model_dir
from nemo_dppo.moe.router_replay import RouterRecorder, RouterReplay, moe_blocks, routing_disagreement


class HFTrainingEngine:
    """Holds the policy π (fp32 by default) and its optimizer."""

    def __init__(
        self, model: nn.Module, train_cfg: TrainConfig, *, temperature: float = 1.0, router_replay: bool = False
    ) -> None:
        self.model = model
        self.cfg = train_cfg
        self.temperature = temperature
        self.router_replay = router_replay
        self.is_moe = _has_moe(model)
        if router_replay and not self.is_moe:
            raise ValueError("rollout.router_replay=true needs an MoE model (no `mlp.gate` routers found)")
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "norm" in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr,
            betas=(train_cfg.betas[0], train_cfg.betas[1]),
        )
        # Mixed precision: fp32 master weights, autocast compute; fp16 adds dynamic loss scaling.
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train_cfg.precision]
        device_type = next(model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device_type) if train_cfg.precision == "fp16" else None

    @classmethod
    def from_config(cls, cfg: Config, model_dir: Path) -> HFTrainingEngine:
        """The fp32 policy of `model_dir` with the run's optimiser, temperature and R3 setting."""
        try:
            model, _ = load_model_dir(str(model_dir), "fp32")
        except (FileNotFoundError, ValueError, OSError) as err:
            raise UserError(f"cannot load the policy from {model_dir}: {err}") from None
        return cls(model, cfg.train, temperature=cfg.rollout.temperature, router_replay=cfg.rollout.router_replay)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast_dtype)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, batch: RolloutBatch, *, with_topk: bool = False, with_entropy: bool = False) -> ForwardResult:
        """One forward over `batch` (with gradient when grad mode is on), in target coordinates [N, S-1]."""
        with self._routing(batch) as routing, self._autocast():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            # Targets are padded by one position instead of slicing the logits: a [:, :-1] slice of [N, S, V]
            # cannot be flattened without copying the whole tensor. The extra last position is dropped after.
            token = vocab_parallel_logprobs(  # the whole vocabulary on this process (group=None)
                logits,
                _pad_last(batch.target_ids),
                topk_ids=_pad_last(batch.topk_ids) if with_topk and batch.topk_ids is not None else None,
                temperature=self.temperature,
                with_entropy=with_entropy,
            )
            token = TokenLogprobs(
                logprobs=token.logprobs[:, :-1],
                topk_logprobs=None if token.topk_logprobs is None else token.topk_logprobs[:, :-1],
                entropy=None if token.entropy is None else token.entropy[:, :-1],
            )
            used, own = routing() if routing is not None else (None, None)
        return ForwardResult(token, used, own)

    @contextlib.contextmanager
    def _routing(self, batch: RolloutBatch) -> Iterator:
        """Replay (R3) or record the routes of this forward; yields a callable giving (used, own) disagreement."""
        if not self.is_moe or batch.routes is None:
            yield None
            return
        valid = batch.route_valid
        if self.router_replay:
            # The recorder hooks in after the replay, so it sees the experts the forward really used.
            with RouterReplay(self.model, batch.routes) as replay, RouterRecorder(self.model) as used:
                yield lambda: (routing_disagreement(used.routes(), batch.routes, valid), replay.disagreement(valid))
        else:
            with RouterRecorder(self.model) as recorder:
                yield lambda: (routing_disagreement(recorder.routes(), batch.routes, valid),) * 2

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> ForwardResult:
        """log π_old on the rollout batch before any update (+ Top-K, entropy, routing disagreement)."""
        self.model.eval()
        out = self.forward(batch, with_topk=batch.topk_ids is not None, with_entropy=True)
        bad = batch.response_mask & ~torch.isfinite(out.token.logprobs)
        if bad.any():
            raise TrainingDiverged(
                f"the policy's log-probs are NaN/inf at {int(bad.sum())} response tokens before the update"
            )
        return out

    # --------------------------------------------------------------------------------------------- update
    def train_step(self, minibatch: RolloutBatch, loss_cfg: LossConfig) -> TrainStepResult:
        """One optimizer step on a mini-batch (gradient accumulation over micro-batches)."""
        self.model.train()
        n = minibatch.num_sequences
        micro = self.cfg.micro_batch_size or n
        num_tokens = float(minibatch.response_mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[tuple[dict[str, float], float]] = []
        forwards: list[ForwardResult] = []
        for start in range(0, n, micro):
            mb = minibatch.select(slice(start, start + micro))
            out = self.forward(mb, with_topk=mb.topk_ids is not None, with_entropy=True)
            inputs = PolicyLossInput(
                logprobs=out.token.logprobs,
                rollout_logprobs=mb.rollout_logprobs,
                advantages=mb.advantages,
                response_mask=mb.response_mask,
                old_logprobs=mb.old_logprobs,
                topk_rollout_logprobs=mb.topk_rollout_logprobs,
                topk_train_logprobs=out.token.topk_logprobs,
                global_num_tokens=max(num_tokens, 1.0),
                global_num_seqs=float(n),
            )
            try:
                loss, metrics = compute_policy_loss(inputs, loss_cfg)
            except ValueError as err:  # non-finite log π from the model
                raise TrainingDiverged(f"{err}; step not applied") from None
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the policy loss is {loss.item()} (mode {loss_cfg.mode}); step not applied")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            parts.append((metrics, float(mb.response_mask.sum())))
            forwards.append(_detached(out))
        metrics = combine_metrics(parts)
        metrics.update(self._optimizer_step(loss_cfg.mode))
        return TrainStepResult(metrics, _concat_forwards(forwards, [w for _, w in parts]))

    def _optimizer_step(self, mode: str) -> dict[str, float]:
        """Clip, then step (fp16: through the scaler, an overflow skips the step); returns the step's metrics."""
        metrics: dict[str, float] = {}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        if self.scaler is not None:  # an overflow skips the step and backs the scale off
            metrics["loss_scale"] = float(self.scaler.get_scale())
            self.scaler.step(self.optimizer)
            self.scaler.update()
            metrics["skipped_step"] = float(not math.isfinite(grad_norm))
        elif not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"the gradient norm is {grad_norm} (mode {mode}); step not applied")
        else:
            self.optimizer.step()
        metrics["grad_norm"] = grad_norm
        return metrics

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, manager: CheckpointManager | None, state: TrainerState, tokenizer: Any, config_yaml: str
    ) -> Path:
        """HF model dir + optimizer (+ fp16 grad scaler) through the run's checkpoint manager."""
        assert manager is not None, "the hf engine is a one-process job: the main rank holds the manager"
        extra = {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return manager.save(state, self.model, tokenizer, self.optimizer, config_yaml, extra)

    def load_checkpoint(self, checkpoint: Path, payload: Mapping[str, Any]) -> None:
        """The weights came from `checkpoint/model` at construction; restore optimizer and scaler."""
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and "grad_scaler" in payload:
            self.scaler.load_state_dict(payload["grad_scaler"])

    def hf_state_dict(self) -> Mapping[str, torch.Tensor]:
        return self.model.state_dict()


def combine_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Micro-batch metrics → mini-batch metrics: sum the losses (global denominators), min/max the extremes,
    token-weight everything else."""
    if len(parts) == 1:
        return dict(parts[0][0])
    total = sum(w for _, w in parts) or 1.0
    out: dict[str, float] = {}
    for key in parts[0][0]:
        values = [m[key] for m, _ in parts]
        if key in ("loss", "num_tokens"):
            out[key] = sum(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(m[key] * w for m, w in parts) / total
    return out


def _detached(out: ForwardResult) -> ForwardResult:
    token = out.token
    detach = (lambda x: None if x is None else x.detach())  # noqa: E731
    return ForwardResult(
        TokenLogprobs(detach(token.logprobs), detach(token.topk_logprobs), detach(token.entropy)),
        out.used_disagreement,
        out.own_disagreement,
    )


def _concat_forwards(parts: list[ForwardResult], weights: list[float]) -> ForwardResult:
    """Micro-batch forwards → the mini-batch's (rows concatenated; routing fractions token-weighted)."""
    if len(parts) == 1:
        return parts[0]
    cat = (lambda xs: None if xs[0] is None else torch.cat(xs))  # noqa: E731
    token = TokenLogprobs(
        cat([p.token.logprobs for p in parts]),
        cat([p.token.topk_logprobs for p in parts]),
        cat([p.token.entropy for p in parts]),
    )
    total = sum(weights) or 1.0

    def mean(values: list[float | None]) -> float | None:
        return None if values[0] is None else sum(v * w for v, w in zip(values, weights, strict=True)) / total

    return ForwardResult(token, mean([p.used_disagreement for p in parts]), mean([p.own_disagreement for p in parts]))


def _pad_last(ids: torch.Tensor) -> torch.Tensor:
    """[N, S-1, ...] target ids → [N, S, ...] with a dummy id 0 at the last position."""
    return torch.cat([ids, ids.new_zeros(ids.shape[0], 1, *ids.shape[2:])], dim=1)


def _has_moe(model: nn.Module) -> bool:
    try:
        moe_blocks(model)
    except ValueError:
        return False
    return True
