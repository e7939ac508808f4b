"""`DPPOLossFn`: DPPO (and every mode of the loss core) as a NeMo-RL loss function.

Calling conventions reproduced from NeMo-RL's source (see `nemo_dppo.nemo_rl.versions`):

- v0.6 / v0.7 / main — `prepare_loss_input` then
  `loss_fn(data=mb, global_valid_seqs=G, global_valid_toks=N, next_token_logprobs=lp)` for `input_type == LOGPROB`
  (`lp` [B, S−1] fp32, TP-reduced, CP-gathered), or `..., logits=x)` for `input_type == LOGIT` (the worker's
  vocabulary-sharded logits; the TP group is Megatron's). Binary modes declare LOGPROB, Top-K modes LOGIT (they
  need π at the rollout's K ids, which only the logits have).
- v0.5 — `loss_fn(next_token_logits, data, global_valid_seqs, global_valid_toks, vocab_parallel_rank=r,
  vocab_parallel_group=g, context_parallel_group=c)` for every loss: logits [B, S, V/TP].

In every case: μ = `data["generation_logprobs"][:, 1:]` (the rollout engine's log-probs, DPPO's anchor), the mask
is `data["token_mask"][:, 1:] * data["sample_mask"][:, None]`, advantages `data["advantages"][:, 1:]`, decoupled
modes and `minirl` read π_old from `data["prev_logprobs"][:, 1:]`, Top-K modes read
`data["generation_topk_ids" / "generation_topk_logprobs"][:, 1:]`. The loss is the loss core's
(`compute_policy_loss`) with the global denominators `global_valid_toks` / `global_valid_seqs`, so NeMo-RL's sum of
micro-batch losses (and gradients) equals the loss core on the whole global batch. Metrics follow NeMo-RL's
summation convention (`nemo_dppo.nemo_rl.metrics`).

Importable inside NeMo-RL's Megatron workers with only torch and nemo_dppo installed (no omegaconf / hydra / ray):
put nemo-dppo on their path, e.g. `export PYTHONPATH=/path/to/nemo-dppo:$PYTHONPATH` before `ray start` / the
driver (NeMo-RL passes the driver's environment to every worker), or `pip install -e /path/to/nemo-dppo --no-deps`
into each of the container's worker venvs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from nemo_dppo.logprobs import DEFAULT_CHUNK_TOKENS
from nemo_dppo.losses import PolicyLossInput, compute_policy_loss
from nemo_dppo.nemo_rl import data_keys as keys
from nemo_dppo.nemo_rl.from_logits import next_token_logprobs_from_logits
from nemo_dppo.nemo_rl.loss_settings import DPPOLossSettings, loss_settings
from nemo_dppo.nemo_rl.metrics import metric_normalizations, mismatch_metrics, nemo_rl_metrics
from nemo_dppo.nemo_rl.versions import LOSS_ATTRIBUTES, LossInputType, LossType


class DPPOLossFn:
    """A NeMo-RL `LossFunction` computing `nemo_dppo.losses.compute_policy_loss` (mode from `loss_fn.mode`).

    `cfg`: the `loss_fn:` config section (mapping or NeMo-RL's pydantic model; see `nemo_dppo.nemo_rl.loss_settings`
    for the key mapping), a `LossConfig`, or ready `DPPOLossSettings`. `max_new_tokens` fills `max_response_len`
    for the Dr.GRPO aggregation. `chunk_tokens` bounds the [chunk, V/TP] temporaries of the logits path.
    """

    def __init__(
        self,
        cfg: Any = None,
        *,
        max_new_tokens: int | None = None,
        strict: bool = True,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        settings = (
            cfg
            if isinstance(cfg, DPPOLossSettings)
            else loss_settings({} if cfg is None else cfg, max_new_tokens=max_new_tokens, strict=strict)
        )
        self.settings = settings
        self.cfg = settings.core
        self.topk = settings.topk
        self.chunk_tokens = chunk_tokens
        self.loss_type = LossType.TOKEN_LEVEL if settings.token_level else LossType.SEQUENCE_LEVEL
        self.input_type = LossInputType.LOGIT if settings.needs_topk else LossInputType.LOGPROB
        self.metric_normalizations = metric_normalizations(settings.token_level)
        self.__dict__.update(LOSS_ATTRIBUTES)  # what NeMo-RL reads on a loss object, every version's name

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle the settings only: the unpickling process (a NeMo-RL worker) resolves NeMo-RL's enums itself, so
        the pickle never refers to `nemo_rl` modules the worker may not be able to import."""
        return (_rebuild, (self.settings, self.chunk_tokens))

    def __repr__(self) -> str:
        return f"DPPOLossFn(mode={self.cfg.mode!r}, agg={self.cfg.agg!r}, topk={self.topk})"

    def __call__(
        self,
        next_token_logits: torch.Tensor | None = None,
        data: Mapping[str, Any] | None = None,
        global_valid_seqs: torch.Tensor | float | None = None,
        global_valid_toks: torch.Tensor | float | None = None,
        vocab_parallel_rank: int | None = None,
        vocab_parallel_group: dist.ProcessGroup | None = None,
        context_parallel_group: dist.ProcessGroup | None = None,
        *,
        next_token_logprobs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of one micro-batch (see the module docstring for the three calling conventions)."""
        del vocab_parallel_rank  # the rank's vocabulary offset comes from its rank in vocab_parallel_group
        if data is None:
            raise TypeError("DPPOLossFn needs data= (the micro-batch's BatchedDataDict)")
        if next_token_logits is not None and next_token_logits.dim() == 2 and next_token_logprobs is None:
            next_token_logprobs, next_token_logits = next_token_logits, None  # positional log-probs (v0.6+ order)
        logits = logits if logits is not None else next_token_logits
        if (logits is None) == (next_token_logprobs is None):
            raise TypeError("DPPOLossFn needs exactly one of next_token_logprobs= (LOGPROB) or logits (LOGIT / v0.5)")

        mask = _sliced(data, keys.TOKEN_MASK, self) * _get(data, keys.SAMPLE_MASK, self).unsqueeze(-1)
        advantages = _sliced(data, keys.ADVANTAGES, self)
        rollout = _sliced(data, keys.GENERATION_LOGPROBS, self)
        prev = _sliced(data, keys.PREV_LOGPROBS, self) if keys.PREV_LOGPROBS in data else None
        topk_ids = topk_mu = None
        if self.settings.needs_topk:
            topk_ids, topk_mu = self._rollout_topk(data)

        logprobs, topk_pi = self._train_logprobs(
            data, next_token_logprobs, logits, topk_ids, vocab_parallel_group, context_parallel_group
        )
        if logprobs.shape != rollout.shape:
            raise ValueError(
                f"next-token log-probs have shape {tuple(logprobs.shape)}; expected [B, S − 1]={tuple(rollout.shape)} "
                "(data tensors are [B, S] and sliced [:, 1:])"
            )

        old = prev if self.settings.needs_old_logprobs else None
        inputs = PolicyLossInput(logprobs, rollout, advantages, mask, old, topk_mu, topk_pi, global_valid_toks,
                                 global_valid_seqs)  # fmt: skip
        loss, core = compute_policy_loss(inputs, self.cfg)
        n_global = float(mask.sum()) if global_valid_toks is None else float(global_valid_toks)
        metrics = nemo_rl_metrics(
            core,
            mask=mask,
            advantages=advantages,
            sample_mask=_get(data, keys.SAMPLE_MASK, self),
            global_valid_toks=n_global,
            mismatch=mismatch_metrics(
                rollout.detach(), _detached(prev), mask, n_global, kl_type=self.settings.gen_kl_type
            ),
        )
        return loss, metrics

    def _train_logprobs(
        self,
        data: Mapping[str, Any],
        next_token_logprobs: torch.Tensor | None,
        logits: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        vocab_parallel_group: dist.ProcessGroup | None,
        context_parallel_group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π [B, S − 1] (differentiable) and, for Top-K modes, log π at the rollout's ids [B, S − 1, K]."""
        if next_token_logprobs is not None:
            if topk_ids is not None:
                raise TypeError(
                    f"loss_fn.mode={self.cfg.mode} needs the logits (π at the rollout's Top-K ids) but was called with "
                    "next_token_logprobs; NeMo-RL passes logits when input_type is LossInputType.LOGIT"
                )
            return next_token_logprobs, None
        assert logits is not None
        from_logits = next_token_logprobs_from_logits(
            logits,
            _get(data, keys.INPUT_IDS, self),
            topk_ids=topk_ids,
            vocab_parallel_group=vocab_parallel_group,
            context_parallel_group=context_parallel_group,
            chunk_tokens=self.chunk_tokens,
        )
        return from_logits.logprobs, from_logits.topk_logprobs

    def _rollout_topk(self, data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rollout's Top-K ids [B, S, K] (aligned with input_ids) and log μ [B, S − 1, K] (sliced), checked
        against `loss_fn.topk`."""
        if keys.TOPK_IDS not in data or keys.TOPK_LOGPROBS not in data:
            raise KeyError(
                f"loss_fn.mode={self.cfg.mode} needs data['{keys.TOPK_IDS}'] and data['{keys.TOPK_LOGPROBS}'] "
                "[B, S, K] from the rollout; start training with `python -m nemo_dppo.nemo_rl.run`, which asks vLLM "
                "for K log-probs and carries them into the training batch"
            )
        ids = data[keys.TOPK_IDS]
        logprobs = data[keys.TOPK_LOGPROBS][:, 1:]
        if ids.shape[-1] != self.topk:
            raise ValueError(
                f"data['{keys.TOPK_IDS}'] has K={ids.shape[-1]} but loss_fn.topk={self.topk}; the rollout and the "
                "loss must use the same K"
            )
        return ids, logprobs


def _rebuild(settings: DPPOLossSettings, chunk_tokens: int) -> DPPOLossFn:
    return DPPOLossFn(settings, chunk_tokens=chunk_tokens)


def _get(data: Mapping[str, Any], key: str, loss: DPPOLossFn) -> torch.Tensor:
    try:
        return data[key]
    except KeyError:
        present = ", ".join(sorted(data))
        raise KeyError(f"{loss!r} needs data['{key}'] (NeMo-RL's training batch); keys present: {present}") from None


def _sliced(data: Mapping[str, Any], key: str, loss: DPPOLossFn) -> torch.Tensor:
    """`data[key][:, 1:]`: [B, S] per-token data aligned with the next-token log-probs [B, S − 1]."""
    return _get(data, key, loss)[:, 1:]


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()
