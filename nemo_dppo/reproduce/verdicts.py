"""The paper's takeaways as rules over a sweep's summaries: reproduced / not reproduced / inconclusive.

Each rule compares groups of seeds with `analysis.steadier` / `analysis.exceeds` (a difference counts only beyond
the pooled sd over seeds and 0.02); "evidence for" and "evidence against" are both looked for, so a verdict is
`reproduced` only with evidence for and none against, `not reproduced` with none for, else `inconclusive`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from nemo_dppo.reproduce.analysis import GroupSummary, Verdict, exceeds, steadier

Groups = dict[tuple[str, float], GroupSummary]


def _decide(takeaway: str, rule: str, pairs: list[tuple[str, bool, bool]]) -> Verdict:
    """`pairs`: (what was compared, evidence for, evidence against)."""
    found_for = [w for w, f, _ in pairs if f]
    found_against = [w for w, _, a in pairs if a]
    if not pairs:
        return Verdict(takeaway, "inconclusive", rule, "the experiment did not run")
    verdict = "reproduced" if found_for and not found_against else "not reproduced" if not found_for else "inconclusive"
    evidence = f"for: {'; '.join(found_for) or 'none'} — against: {'; '.join(found_against) or 'none'}"
    return Verdict(takeaway, verdict, rule, evidence)


def _pairs(groups: Groups, a: str, b: str, lrs: list[float], test: Callable[[GroupSummary, GroupSummary], bool]
           ) -> list[tuple[str, bool, bool]]:  # fmt: skip
    out = []
    for lr in lrs:
        if (a, lr) in groups and (b, lr) in groups:
            ga, gb = groups[(a, lr)], groups[(b, lr)]
            out.append((f"{a} vs {b} @ lr {lr:g}", test(ga, gb), test(gb, ga)))
    return out


def _lrs(groups: Groups, method: str) -> list[float]:
    return sorted(lr for m, lr in groups if m == method)


def trust_region_needed(groups: Groups) -> Verdict:
    lrs = _lrs(groups, "dppo_binary_kl")
    pairs = [p for d in ("dppo_binary_tv", "dppo_binary_kl") for m in ("pg_is", "pg_tis")
             for p in _pairs(groups, d, m, lrs, steadier)]  # fmt: skip
    return _decide("1. A trust region is needed, even at small learning rates (Fig. 3)",
                   "DPPO-TV/KL steadier (higher final accuracy or fewer collapsed seeds) than PG-IS / PG-TIS at some "
                   "learning rate, and never less steady", pairs)  # fmt: skip


def anchor_at_mu(groups: Groups) -> Verdict:
    pairs = _pairs(groups, "dppo_binary_kl", "dppo_binary_kl_decoupled", _lrs(groups, "dppo_binary_kl_decoupled"),
                   steadier)
    pairs += _pairs(groups, "dppo_binary_kl", "minirl", _lrs(groups, "minirl"), steadier)
    return _decide("2. Anchor the trust region at the rollout policy μ, not a recomputed π_old (Figs. 3-4)",
                   "DPPO-Binary-KL (μ anchor) steadier than its π_old-anchored twin and than MiniRL, never less",
                   pairs)  # fmt: skip


def few_bad_updates(groups: Groups) -> Verdict:
    lrs = _lrs(groups, "neg_mask_0.5")
    pairs = _pairs(groups, "neg_mask_0.5", "pg_is", lrs, steadier)
    for other in ("neg_mask_0.8", "neg_mask_0.5_decoupled"):
        pairs += _pairs(groups, "neg_mask_0.5", other, lrs, steadier)
    return _decide("3. The instability comes from a few large negative updates: masking A < 0 tokens with "
                   "μ − π ≥ 0.5 stabilises PG-IS; δ = 0.8 or a π_old anchor does not (Fig. 5)",
                   "the δ = 0.5 mask steadier than PG-IS, than δ = 0.8 and than its π_old-anchored twin", pairs)


def truncation_hurts(groups: Groups) -> Verdict:
    def earlier(a: GroupSummary, b: GroupSummary) -> bool:  # a collapses earlier or more often, or ends lower
        fa, fb = a.first_collapse, b.first_collapse
        sooner = fa is not None and (fb is None or fa < fb)
        return sooner or a.collapsed > b.collapsed or exceeds(b.final, a.final)

    pairs = []
    for tis, plain in (("pg_tis", "pg_is"), ("minirl_tis", "minirl")):
        pairs += _pairs(groups, tis, plain, _lrs(groups, tis), earlier)
    return _decide("4. Truncated importance sampling hurts stability (Sec. 5.4)",
                   "the TIS variant collapses earlier / more often or ends lower than its untruncated twin", pairs)


def clipping_biased(groups: Groups) -> Verdict:
    pairs = []
    for (method, lr), g in groups.items():
        if method != "grpo_clip_higher":
            continue
        values = [g.mean_series(n) for n in ("dropped_mu", "mu", "dropped_entropy", "entropy")]
        if any(math.isnan(v) for v in values):
            continue  # nothing was clipped (or not measured): no evidence either way
        mu_low = g.mean_series("dropped_mu") < g.mean_series("mu")
        entropy_high = g.mean_series("dropped_entropy") > g.mean_series("entropy")
        pairs.append((f"clipped tokens under GRPO-ClipHigher @ lr {lr:g}: μ {g.mean_series('dropped_mu'):.3f} vs "
                      f"{g.mean_series('mu'):.3f} overall, entropy {g.mean_series('dropped_entropy'):.3f} vs "
                      f"{g.mean_series('entropy'):.3f}", mu_low and entropy_high, not mu_low and not entropy_high))
    return _decide("5. Ratio clipping is biased against low-probability, high-entropy tokens (Fig. 6)",
                   "the tokens GRPO-ClipHigher clips have a lower mean μ and a higher mean entropy than all tokens",
                   pairs)  # fmt: skip


def relax_speeds_up(groups: Groups) -> Verdict:
    def faster(a: GroupSummary, b: GroupSummary) -> bool:
        half = max(int(max(r.steps for r in a.runs) / 2), 1)
        return exceeds([_auc(r, half) for r in a.runs], [_auc(r, half) for r in b.runs])

    pairs = _pairs(groups, "relax_both_0.1", "grpo_clip_higher", _lrs(groups, "relax_both_0.1"), faster)
    pairs += _pairs(groups, "relax_both_0.1", "relax_low_0.1", _lrs(groups, "relax_low_0.1"), steadier)
    return _decide("6. Relaxing the bounds of low-probability tokens (α = 0.1) learns faster; relaxing only the low "
                   "bound then degrades, relax-both stays stable (Figs. 6-7)",
                   "relax-both α = 0.1 has a higher mean training accuracy over the first half than α = 0, and is "
                   "steadier than relax-low", pairs)  # fmt: skip


def topk_like_binary(groups: Groups) -> Verdict:
    def differ(a: GroupSummary, b: GroupSummary) -> bool:
        return exceeds(a.final, b.final) or exceeds(b.final, a.final) or a.collapsed != b.collapsed

    pairs = []
    for topk, binary in (("dppo_topk_tv", "dppo_binary_tv"), ("dppo_topk_kl", "dppo_binary_kl")):
        for what, d, _ in _pairs(groups, topk, binary, _lrs(groups, topk), differ):
            pairs.append((what, not d, d))
    return _decide("7. Top-K (K = 20) TV / KL perform like the binary estimates (App. G.2)",
                   "no difference beyond noise in final accuracy, nor in collapsed seeds", pairs)


def _auc(run, until: int) -> float:
    values = [v for s, v in zip(run.series["step"], run.series["accuracy"], strict=True) if s <= until]
    return sum(values) / len(values) if values else 0.0


TAKEAWAYS = (trust_region_needed, anchor_at_mu, few_bad_updates, truncation_hurts, clipping_biased,
             relax_speeds_up, topk_like_binary)  # fmt: skip


def all_verdicts(groups: Groups) -> list[Verdict]:
    return [rule(groups) for rule in TAKEAWAYS]
