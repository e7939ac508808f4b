"""NeMo-RL's loss-interface enums: NeMo-RL's own classes when it is importable, identical stand-ins otherwise.

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

__all__ = ["NEMO_RL_IMPORTABLE", "LossInputType", "LossType", "MetricNormalizer"]
