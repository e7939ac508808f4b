"""Every NeMo-RL version difference this package handles (v0.5, v0.6, v0.7.0, main), in one place.

1. The loss-interface enums: NeMo-RL's own classes when it is importable, identical stand-ins otherwise.
2. `LOSS_ATTRIBUTES`: what NeMo-RL's code reads on a loss object, under each version's name.
3. The GRPO entry's differences (`master_config`, `section`, `loss_position`, `generation_kwargs`): `launch/run.py`.

NeMo-RL (read: v0.5.0, v0.6.0, v0.7.0 and main of github.com/NVIDIA-NeMo/RL) declares in
`nemo_rl/algorithms/loss/interfaces.py` (v0.6+; `nemo_rl/algorithms/interfaces.py` in v0.5, `LossType` only):

- `LossType` {TOKEN_LEVEL, SEQUENCE_LEVEL}: which global count (`global_valid_toks` / `global_valid_seqs`) the loss
  divides by; the Megatron worker checks it (token-level losses need `token_mask`).
- `LossInputType` {LOGIT, LOGPROB, ...} (v0.6+): `prepare_loss_input` calls a LOGPROB loss with
  `next_token_logprobs=` [B, S−1] (already reduced over TP and gathered over CP) and a LOGIT loss with `logits=`
  (the worker's raw, vocabulary-sharded, temperature-scaled logits).
- `MetricNormalizer` {TOKENS, SEQUENCES, NONE} (main, after v0.7.0): what each returned metric was divided by.

The stand-ins carry the same member names and values, so code written against them behaves the same; when nemo_rl
is importable (inside NeMo-RL's container and Ray workers) its classes are used, so `loss_fn.input_type ==
LossInputType.LOGPROB` comparisons inside NeMo-RL hold. Only the standard library and torch-free imports here:
this module is loaded inside NeMo-RL's Megatron workers.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterable, Mapping
from typing import Any


class _LossType(enum.Enum):
    TOKEN_LEVEL = "token_level"
    SEQUENCE_LEVEL = "sequence_level"


class _LossInputType(enum.Enum):
    LOGIT = "logit"
    LOGPROB = "logprob"
    DISTILLATION = "distillation"
    DRAFT = "draft"


class _MetricNormalizer(enum.Enum):
    TOKENS = "tokens"
    SEQUENCES = "sequences"
    NONE = "none"


#: Where each enum lives, newest layout first.
_LOCATIONS = ("nemo_rl.algorithms.loss.interfaces", "nemo_rl.algorithms.interfaces")


def _from_nemo_rl(name: str, fallback: type[enum.Enum]) -> tuple[Any, bool]:
    """NeMo-RL's enum `name` if some installed layout has it, else `fallback`; and whether NeMo-RL's was found."""
    for module_name in _LOCATIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = getattr(module, name, None)
        if found is not None:
            return found, True
    return fallback, False


LossType, _HAVE_LOSS_TYPE = _from_nemo_rl("LossType", _LossType)
LossInputType, _ = _from_nemo_rl("LossInputType", _LossInputType)
MetricNormalizer, _ = _from_nemo_rl("MetricNormalizer", _MetricNormalizer)

#: True when the enums above are NeMo-RL's own (nemo_rl is importable in this process).
NEMO_RL_IMPORTABLE: bool = _HAVE_LOSS_TYPE

#: Attributes NeMo-RL reads on its loss object (prepare_loss_input, setup, the policy workers) and DPPO's values.
LOSS_ATTRIBUTES: dict[str, Any] = {
    "reference_policy_kl_penalty": 0.0,
    "force_on_policy_ratio": False,
    "use_linear_ce_fusion": False,  # v0.7's name
    "use_fused_linear_logprobs": False,  # main's name of the same switch
}


def master_config(grpo: Any, plain: dict[str, Any]) -> Any:
    """NeMo-RL ≥ 0.7's `MasterConfig` is a pydantic model built from the dict; older versions use the dict."""
    master_cls = getattr(grpo, "MasterConfig", None)
    if master_cls is not None and hasattr(master_cls, "model_validate"):
        return master_cls(**plain)
    return plain


def section(master: Any, name: str) -> Any:
    """A top-level section of the master config: a dict key (≤ 0.6) or a pydantic attribute (≥ 0.7)."""
    return master[name] if isinstance(master, Mapping) else getattr(master, name)


def loss_position(outputs: list[Any]) -> int | None:
    """Where `setup()` returned its ClippedPGLossFn (v0.5/v0.6: 10 values, v0.7: 13), found by type; None if not
    where the entry expects it (dataloaders just before it, logger … master_config after it)."""
    for index, value in enumerate(outputs):
        if type(value).__name__ == "ClippedPGLossFn":
            return index if index >= 4 and index + 4 < len(outputs) else None
    return None


def generation_kwargs(policy: Any, accepted: Iterable[str]) -> dict[str, Any]:
    """The keyword arguments of `configure_generation_config` that the installed version accepts (main added two)."""
    extra = {
        "has_refit_draft_weights": bool((policy.get("draft") or {}).get("enabled", False)),
        "trains_mtp": bool((policy.get("megatron_cfg") or {}).get("mtp_num_layers")),
    }
    return {k: v for k, v in extra.items() if k in set(accepted)}


__all__ = ["LOSS_ATTRIBUTES", "NEMO_RL_IMPORTABLE", "LossInputType", "LossType", "MetricNormalizer"]
