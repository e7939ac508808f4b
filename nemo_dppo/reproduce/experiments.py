"""The experiments of `nemo-dppo reproduce`, as data: each method is a set of config overrides on one shared config.

Every method runs at the paper's defaults (δ 0.15 TV / 0.05 KL, ε 0.2 / 0.28, C = 1e4 unless the method is a
truncated-IS one); nothing is tuned per method. The `stability` experiment runs every method over one learning-
rate grid; the others run at `DEFAULT_LR`. Identical (method, lr, seed) runs are shared between experiments.

The grid started as 1e-4, 3e-4, 1e-3; the first full sweep found every method stable at 1e-4 and every method
collapsed within 6 steps at 1e-3, so 5e-4 was added (for every method alike) to see where the boundary lies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The shared learning-rate grid of Figure 3 (AdamW, constant), and the one learning rate of the other experiments.
LEARNING_RATES = (1e-4, 3e-4, 5e-4, 1e-3)
DEFAULT_LR = 3e-4
#: C of the truncated-IS variants (MiniRL-TIS): the weight is min(r, C).
TIS_CAP = 2.0


@dataclass(frozen=True)
class Method:
    name: str  # also the run-directory prefix: one name, one set of overrides
    label: str  # as the paper names it
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Experiment:
    name: str
    figure: str
    title: str
    methods: tuple[Method, ...]
    learning_rates: tuple[float, ...] = (DEFAULT_LR,)
    panels: tuple[str, ...] = ("accuracy", "mismatch")
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _m(name: str, label: str, *overrides: str) -> Method:
    return Method(name, label, overrides)


DPPO_TV = _m("dppo_binary_tv", "DPPO-Binary-TV", "loss=dppo_binary_tv")
DPPO_KL = _m("dppo_binary_kl", "DPPO-Binary-KL", "loss=dppo_binary_kl")
GRPO_CH = _m("grpo_clip_higher", "GRPO-ClipHigher", "loss=grpo_clip_higher")
PG_IS = _m("pg_is", "PG-IS", "loss=pg_is")
PG_TIS = _m("pg_tis", "PG-TIS (CISPO)", "loss=cispo")
MINIRL = _m("minirl", "MiniRL", "loss=minirl")
MINIRL_TIS = _m("minirl_tis", "MiniRL-TIS", "loss=minirl", f"loss.ratio_cap={TIS_CAP}")


def _relax(name: str, label: str, relax: str, alpha: float) -> Method:
    return _m(name, label, "loss=grpo_clip_higher", f"loss.relax={relax}", f"loss.relax_prob_threshold={alpha}")


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "stability", "Figure 3", "Stability: trust regions against none, over one learning-rate grid",
            (DPPO_TV, DPPO_KL, GRPO_CH, PG_IS, PG_TIS, MINIRL, MINIRL_TIS), learning_rates=LEARNING_RATES,
        ),
        Experiment(
            "anchor", "Figure 4", "The anchor: DPPO-Binary-KL at μ against the same mask at the recomputed π_old",
            (DPPO_KL, _m("dppo_binary_kl_decoupled", "DPPO-Binary-KL (π_old anchor)", "loss=dppo_binary_kl",
                         "loss.mode=dppo_binary_kl_decoupled")),
        ),
        Experiment(
            "bad_updates", "Figure 5", "A minimal mask: PG-IS with only the large negative updates dropped",
            (PG_IS,
             _m("neg_mask_0.5", "PG-IS + mask δ=0.5", "loss=pg_is", "loss.mode=neg_mask", "loss.neg_mask_delta=0.5"),
             _m("neg_mask_0.8", "PG-IS + mask δ=0.8", "loss=pg_is", "loss.mode=neg_mask", "loss.neg_mask_delta=0.8"),
             _m("neg_mask_0.5_decoupled", "PG-IS + mask δ=0.5 (π_old anchor)", "loss=pg_is",
                "loss.mode=neg_mask_decoupled", "loss.neg_mask_delta=0.5")),
            panels=("accuracy", "mismatch", "bad_updates"),
        ),
        Experiment(
            "relax", "Figures 6-7", "Relax-α: GRPO-ClipHigher without its bounds for tokens with μ < α",
            (_m("grpo_clip_higher", "α = 0 (GRPO-ClipHigher)", "loss=grpo_clip_higher"),
             _relax("relax_both_0.1", "relax-both α = 0.1", "both", 0.1),
             _relax("relax_both_0.2", "relax-both α = 0.2", "both", 0.2),
             _relax("relax_both_0.5", "relax-both α = 0.5", "both", 0.5),
             _relax("relax_high_0.1", "relax-high α = 0.1", "high", 0.1),
             _relax("relax_low_0.1", "relax-low α = 0.1", "low", 0.1)),
            panels=("accuracy", "dropped_mu", "dropped_entropy", "entropy"),
        ),
        Experiment(
            "topk", "Appendix G.2", "Top-K (K = 20) divergences against the binary ones",
            (DPPO_TV, DPPO_KL, _m("dppo_topk_tv", "DPPO-TopK-TV", "loss=dppo_topk_tv"),
             _m("dppo_topk_kl", "DPPO-TopK-KL", "loss=dppo_topk_kl")),
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}") from None
