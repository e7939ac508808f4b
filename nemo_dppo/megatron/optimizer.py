"""megatron-core's optimizer for the Megatron engine, configured like the `hf` engine's AdamW.

`get_megatron_optimizer` gives a `ChainedOptimizer` (dense parameters and expert parameters, each reduced over
its own groups) of torch AdamW (no Apex / TransformerEngine on CPU), fp32 main parameters, weight decay off for
biases and 1-D parameters, a constant learning rate, global-norm clipping at `train.grad_clip`. bf16 / fp16
training keep fp32 main parameters in the optimizer; fp16 adds megatron-core's `DynamicGradScaler` (initial
scale 2^16, halved on every overflow step — hysteresis 1 — and doubled after 1000 clean steps), the counterpart
of `torch.amp.GradScaler` on the `hf` engine.

`step(optimizer, clip)` is `ChainedOptimizer.step` split open, so that a non-finite gradient norm without loss
scaling stops the run (`TrainingDiverged`) instead of being applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nemo_dppo.config import TrainConfig
from nemo_dppo.megatron import cpu_compat

#: Dynamic loss scaling (fp16): the first scale, and the steps without overflow before it doubles.
INITIAL_LOSS_SCALE = 2.0**16
LOSS_SCALE_WINDOW = 1000


@dataclass
class StepResult:
    applied: bool  # False: an fp16 overflow skipped the step (the scale backed off)
    grad_norm: float  # before clipping; inf when skipped
    loss_scale: float | None  # after the update of the scaler (fp16 only)


def build_optimizer(chunks: list[torch.nn.Module], train_cfg: TrainConfig) -> Any:
    """The Megatron optimizer over the DDP-wrapped model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.betas[0],
        adam_beta2=train_cfg.betas[1],
        adam_eps=1e-8,
        clip_grad=train_cfg.grad_clip,
        bf16=train_cfg.precision == "bf16",
        fp16=train_cfg.precision == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train_cfg.precision],
        loss_scale=None,
        initial_loss_scale=INITIAL_LOSS_SCALE,
        loss_scale_window=LOSS_SCALE_WINDOW,
        hysteresis=1,
        use_distributed_optimizer=False,
    )
    with cpu_compat.cuda_literals_to_cpu():
        optimizer = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    for part in parts(optimizer):  # constant LR; decay multipliers applied (no LR scheduler)
        for group in part.optimizer.param_groups:
            group["lr"] = train_cfg.lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = train_cfg.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def parts(optimizer: Any) -> list[Any]:
    """The sub-optimizers of a `ChainedOptimizer` (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def loss_scale(optimizer: Any) -> float | None:
    """The current fp16 loss scale, or None without loss scaling."""
    scaler = getattr(parts(optimizer)[0], "grad_scaler", None)
    return float(scaler.scale.item()) if scaler is not None else None


@torch.no_grad()
def step(optimizer: Any, clip: float) -> StepResult:
    """Unscale / check overflow → global grad norm → clip → AdamW step (or skip on an fp16 overflow)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    with cpu_compat.cuda_literals_to_cpu():
        found_inf = optimizer.prepare_grads()
        if found_inf:
            return StepResult(applied=False, grad_norm=math.inf, loss_scale=loss_scale(optimizer))
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return StepResult(applied=False, grad_norm=grad_norm, loss_scale=loss_scale(optimizer))
        for part in parts(optimizer):
            params = part.get_parameters()
            if clip > 0 and params and not getattr(part, "is_stub_optimizer", False):
                clip_grad_by_total_norm_fp32(params, max_norm=clip, total_norm=grad_norm)
        optimizer.step_with_ready_grads()
    return StepResult(applied=True, grad_norm=grad_norm, loss_scale=loss_scale(optimizer))
