"""The `loss_fn:` section of a NeMo-RL config → `LossConfig` (+ Top-K size and NeMo-RL loss type).

The section may hold the loss core's own names and NeMo-RL's `ClippedPGLossConfig` names (its GRPO loss, which
`setup()` builds from the same section before `DPPOLossFn` replaces it). Mapping:

- `mode`, `delta_low`, `delta_high`, `ratio_cap`, `agg`, `max_response_len`, `relax`, `relax_prob_threshold`,
  `neg_mask_delta`, `validate`, `clip_low`, `clip_high`, `dual_clip` → the `LossConfig` field of the same name
  (null = the field's default; δ null = 0.15 for TV modes, 0.05 for KL modes).
- `topk` → K of the Top-K modes and of the vLLM log-probs request (null → 20).
- `ratio_clip_min` / `ratio_clip_max` → `clip_low` / `clip_high` (ε of `ppo_clip`, `minirl`, `cispo`);
  `ratio_clip_c` → `dual_clip`.
- `token_level_loss` true / false → `agg` token-mean / seq-mean-token-mean (NeMo-RL's TOKEN_LEVEL /
  SEQUENCE_LEVEL) when `agg` is null; an explicit `agg` must agree with it.
- `use_cispo: true` → `mode: cispo`.
- `loss_mode` (NeMo-RL PR #4069's key) = `mode`; both set must name the same loss. Other frameworks' names
  (verl's `dppo_tv`, Stable-RL's `ppo_recompute`, ...) resolve through `nemo_dppo.losses.aliases` with one log line.
- `truncated_importance_sampling_ratio` (type `tis` or null) → `ratio_cap` C of min(π/μ, C).
- `reference_policy_kl_type` (k1 / k2 / k3, null → k3) → the estimator of the `gen_kl_error` metric (as NeMo-RL).
- accepted without effect: `use_importance_sampling_correction` (DPPO's ratio is already π/μ, the rollout policy
  is the anchor), `kl_input_clamp_value`, `kl_output_clamp_value`,
  `use_on_policy_kl_approximation`, `use_kl_in_reward` (KL options; DPPO uses no KL penalty).
- rejected (no DPPO equivalent): `reference_policy_kl_penalty` ≠ 0 without `use_kl_in_reward`,
  `disable_ppo_ratio`, `sequence_level_importance_ratios`, `force_on_policy_ratio`, `positive_example_nll_weight`
  ≠ 0, `truncated_importance_sampling_type` icepop / seq-mask-tis, `truncated_importance_sampling_ratio_min`.

Setting one quantity under both names (`clip_low` and `ratio_clip_min`, ...) with different values is an error.
Imports only the standard library and the loss core: this module is loaded inside NeMo-RL's Megatron workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nemo_dppo.losses import DEFAULT_TOPK, LossConfig, get_mode
from nemo_dppo.losses.aliases import resolve_mode_name
from nemo_dppo.nemo_rl.key_errors import unknown_key_message

#: K when `loss_fn.topk` is null and the mode needs Top-K (the paper's K).

#: NeMo-RL's KL estimators (`calculate_kl`), used for the `gen_kl_error` metric; k3 is NeMo-RL's default.
KL_TYPES = ("k1", "k2", "k3")

#: `LossConfig` fields, settable in `loss_fn:` under their own names.
CORE_KEYS = tuple(f.name for f in dataclasses.fields(LossConfig))
DPPO_KEYS = (*CORE_KEYS, "topk")

#: NeMo-RL ClippedPGLoss names → the `LossConfig` field they set.
RENAMED = {"ratio_clip_min": "clip_low", "ratio_clip_max": "clip_high", "ratio_clip_c": "dual_clip"}

#: NeMo-RL keys that must hold a neutral value: DPPO has no equivalent of the feature they switch on.
MUST_BE_NEUTRAL = {
    "disable_ppo_ratio": False,
    "sequence_level_importance_ratios": False,
    "force_on_policy_ratio": False,
    "positive_example_nll_weight": 0.0,
    "truncated_importance_sampling_ratio_min": None,
}

#: NeMo-RL keys accepted without effect on the DPPO loss (see the module docstring).
IGNORED = (
    "use_importance_sampling_correction",
    "kl_input_clamp_value",
    "kl_output_clamp_value",
    "use_on_policy_kl_approximation",
    "use_kl_in_reward",
)

#: Every NeMo-RL `ClippedPGLossConfig` field (v0.7.0 / main).
NEMO_RL_KEYS = (
    *RENAMED,
    *MUST_BE_NEUTRAL,
    *IGNORED,
    "loss_mode",
    "token_level_loss",
    "use_cispo",
    "reference_policy_kl_penalty",
    "reference_policy_kl_type",
    "truncated_importance_sampling_type",
    "truncated_importance_sampling_ratio",
)

LOSS_FN_KEYS = (*DPPO_KEYS, *NEMO_RL_KEYS)


class LossSettingsError(ValueError):
    """A `loss_fn:` section DPPO cannot honour; the message is one line."""


@dataclass(frozen=True)
class DPPOLossSettings:
    """What `DPPOLossFn` needs: the loss core's config, K (0 when the mode does not use Top-K), the loss type."""

    core: LossConfig
    topk: int
    token_level: bool
    gen_kl_type: str = "k3"

    @property
    def needs_topk(self) -> bool:
        return get_mode(self.core.mode).needs_topk

    @property
    def needs_old_logprobs(self) -> bool:
        return get_mode(self.core.mode).needs_old_logprobs


def as_plain_dict(section: Any) -> dict[str, Any]:
    """A `loss_fn` section as a dict: a Mapping (dict, OmegaConf), a pydantic model or a `LossConfig`."""
    if isinstance(section, LossConfig):
        return dataclasses.asdict(section)
    if isinstance(section, Mapping):
        return {str(k): v for k, v in section.items()}
    dump = getattr(section, "model_dump", None)  # NeMo-RL ≥ 0.7: ClippedPGLossConfig is a pydantic model
    if callable(dump):
        return dict(dump())
    raise TypeError(f"loss_fn section must be a mapping or a pydantic model, got {type(section).__name__}")


def loss_settings(section: Any, *, max_new_tokens: int | None = None, strict: bool = True) -> DPPOLossSettings:
    """Map a `loss_fn:` section onto the loss core (see the module docstring for the table).

    `max_new_tokens` (policy.generation.max_new_tokens) fills `max_response_len` for `seq-mean-token-sum-norm`
    when it is null: NeMo-RL's micro-batches have different lengths, so the batch's own T would be wrong.
    `strict`: unknown keys are an error (a typo would otherwise be ignored silently).
    """
    raw = as_plain_dict(section)
    if strict:
        for key in raw:
            if key not in LOSS_FN_KEYS:
                raise LossSettingsError(unknown_key_message("loss_fn", key, LOSS_FN_KEYS))
    _check_neutral(raw)

    fields = {k: raw[k] for k in CORE_KEYS if raw.get(k) is not None}
    _map_mode(fields, raw)
    for nemo_name, core_name in RENAMED.items():
        if raw.get(nemo_name) is None:
            continue
        _set_once(fields, core_name, raw[nemo_name], nemo_name)
    if raw.get("use_cispo"):
        _set_once(fields, "mode", "cispo", "use_cispo")
    _map_token_level(fields, raw.get("token_level_loss"))
    _map_truncation(fields, raw)
    if fields.get("agg") == "seq-mean-token-sum-norm" and fields.get("max_response_len") is None:
        if max_new_tokens is None:
            raise LossSettingsError(
                "loss_fn.agg=seq-mean-token-sum-norm needs loss_fn.max_response_len (NeMo-RL's micro-batches differ "
                "in length, so the batch's own length cannot be the Dr.GRPO constant)"
            )
        fields["max_response_len"] = int(max_new_tokens)

    try:
        core = LossConfig(**fields)
    except (TypeError, ValueError) as error:
        raise LossSettingsError(str(error).replace("loss.", "loss_fn.")) from None
    topk = 0
    if get_mode(core.mode).needs_topk:
        topk = DEFAULT_TOPK if raw.get("topk") is None else int(raw["topk"])
        if topk < 1:
            raise LossSettingsError(f"loss_fn.topk={topk} must be ≥ 1 for loss_fn.mode={core.mode}")
    kl_type = raw.get("reference_policy_kl_type") or "k3"
    if kl_type not in KL_TYPES:
        raise LossSettingsError(f"loss_fn.reference_policy_kl_type={kl_type!r} must be one of {', '.join(KL_TYPES)}")
    return DPPOLossSettings(core=core, topk=topk, token_level=core.agg == "token-mean", gen_kl_type=kl_type)


def _check_neutral(raw: dict[str, Any]) -> None:
    for key, neutral in MUST_BE_NEUTRAL.items():
        value = raw.get(key)
        if value is not None and value != neutral:
            raise LossSettingsError(
                f"loss_fn.{key}={value!r} is not supported by DPPOLossFn (no DPPO equivalent); set it to {neutral!r}"
            )
    penalty = raw.get("reference_policy_kl_penalty") or 0
    if penalty != 0 and not raw.get("use_kl_in_reward"):
        raise LossSettingsError(
            f"loss_fn.reference_policy_kl_penalty={penalty} is not supported by DPPOLossFn (the paper uses no KL "
            "penalty); set it to 0"
        )
    tis_type = raw.get("truncated_importance_sampling_type")
    if tis_type not in (None, "tis"):
        raise LossSettingsError(
            f"loss_fn.truncated_importance_sampling_type={tis_type!r} is not supported by DPPOLossFn; use null or "
            "'tis' (its ratio becomes the cap C of min(π/μ, C))"
        )


def _map_mode(fields: dict[str, Any], raw: dict[str, Any]) -> None:
    """`mode` or its alias key `loss_mode` (NeMo-RL PR #4069), foreign names resolved; both must agree."""
    names = {key: str(raw[key]) for key in ("mode", "loss_mode") if raw.get(key) is not None}
    resolved = {name: resolve_mode_name(name)[0] for name in set(names.values())}
    if len({resolved[name] for name in names.values()}) > 1:
        raise LossSettingsError(
            f"loss_fn.mode={names['mode']!r} and loss_fn.loss_mode={names['loss_mode']!r} name different losses "
            f"({resolved[names['mode']]} and {resolved[names['loss_mode']]}); keep one of them"
        )
    if names:
        fields["mode"] = resolved[next(iter(names.values()))]


def _set_once(fields: dict[str, Any], name: str, value: Any, source: str) -> None:
    """Set `fields[name]` from NeMo-RL's key `source`; the same quantity set twice to different values is an error."""
    if name in fields and fields[name] != value:
        raise LossSettingsError(
            f"loss_fn.{source}={value!r} and loss_fn.{name}={fields[name]!r} both set {name}; keep one of them"
        )
    fields[name] = value


def _map_token_level(fields: dict[str, Any], token_level_loss: bool | None) -> None:
    """NeMo-RL's TOKEN_LEVEL loss is token-mean; its SEQUENCE_LEVEL loss is seq-mean-token-mean."""
    if token_level_loss is None:
        return
    agg = fields.get("agg")
    if agg is None:
        fields["agg"] = "token-mean" if token_level_loss else "seq-mean-token-mean"
    elif (agg == "token-mean") != bool(token_level_loss):
        raise LossSettingsError(
            f"loss_fn.agg={agg} needs loss_fn.token_level_loss={str(agg == 'token-mean').lower()} "
            "(NeMo-RL divides token-level losses by global_valid_toks, the others by global_valid_seqs)"
        )


def _map_truncation(fields: dict[str, Any], raw: dict[str, Any]) -> None:
    """NeMo-RL's "tis" ratio caps the importance weight: it becomes C when `ratio_cap` is null."""
    ratio = raw.get("truncated_importance_sampling_ratio")
    if ratio is not None:
        _set_once(fields, "ratio_cap", float(ratio), "truncated_importance_sampling_ratio")
