"""Other frameworks' loss-mode names → the registered mode with the same objective (one table, read by every config).

Sources read: verl PR #5397 (`actor_rollout_ref.actor.policy_loss.loss_mode` dppo_tv / dppo_kl, and its `vanilla`)
and Stable-RL (the paper's verl fork, `_compute_token_mask_for_policy_loss`). NeMo-RL's PR #4069 value
`dppo_binary_tv` (key `loss_fn.loss_mode`) and Stable-RL's `dppo_binary_*` / `dppo_topk_*` are already our names.
Only names whose objective equals one of ours map; the note says what differs (defaults, anchor, loss value).
The other frameworks' loss *values* are −A·w·M·log π (ours −A·w·M, Eq. 11): equal gradients, different `loss`.
A leaf: the standard library only (`dppo.py` imports it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

_VERL_DPPO = ("verl anchors D at old_log_prob, which is μ only with algorithm.rollout_correction.bypass_mode=true "
              "(verl's DPPO example); δ is verl's clip_ratio_low/high (default 0.2) — set loss.delta_low/high; "
              "verl's C is clip_ratio_c (default 3.0, its example 1e4 = ours)")  # fmt: skip
_STABLE_RL = "Stable-RL's C is clip_ratio_c (its default 3.0, ours loss.ratio_cap=1e4)"

#: foreign name → (our mode, where the name comes from and what differs). Values must be registered modes.
ALIASES: dict[str, tuple[str, str]] = {
    "dppo_tv": ("dppo_binary_tv", f"verl PR #5397; {_VERL_DPPO}"),
    "dppo_kl": ("dppo_binary_kl", f"verl PR #5397; {_VERL_DPPO}"),
    "vanilla": (
        "ppo_clip",
        "verl's PPO clip; its ratio is π/old_log_prob (= μ with bypass_mode=true), it always "
        "dual-clips at clip_ratio_c=3.0 (set loss.dual_clip=3.0) and clips 0.2/0.2 by default (ours 0.2/0.28)",
    ),
    "dppo_binary_tv_recompute": (
        "dppo_binary_tv_decoupled",
        f"Stable-RL: D against the recomputed π_old, weight π/μ; {_STABLE_RL}",
    ),
    "dppo_binary_kl_recompute": (
        "dppo_binary_kl_decoupled",
        f"Stable-RL: D against the recomputed π_old, weight π/μ; {_STABLE_RL}",
    ),
    "ppo": ("ppo_clip", f"Stable-RL's GRPO: clip on π/μ, no dual clip (keep loss.dual_clip null); {_STABLE_RL}"),
    "ppo_recompute": ("minirl", f"Stable-RL's MiniRL: clip on π/π_old, weight π/μ; {_STABLE_RL}"),
    "pg_no_mask": (
        "pg_is",
        "Stable-RL (commented CISPO there): no mask, weight min(π/μ, C) with C = clip_ratio_c "
        "(its default 3.0; set loss.ratio_cap) — our cispo clamps on both sides instead",
    ),
}


def resolve_mode_name(name: str) -> tuple[str, str | None]:
    """(our mode name, note): a foreign name from `ALIASES` logs its one-line note; other names pass unchanged.

    Unknown names are left to `dppo.get_mode`, whose one-line error lists our modes and these aliases."""
    if name not in ALIASES:
        return name, None
    mode, source = ALIASES[name]
    note = f"loss mode {name!r} is another framework's name: using {mode!r} ({source})"
    logger.warning(note)
    return mode, note


def unknown_mode_message(name: str, modes: Iterable[str]) -> str:
    """The one-line error for a mode name that is neither one of `modes` nor an alias."""
    ours, theirs = ", ".join(sorted(modes)), ", ".join(sorted(ALIASES))
    return f"unknown loss.mode {name!r}; valid modes: {ours}; other frameworks' names: {theirs}"
