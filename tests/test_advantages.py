"""Advantage estimators against hand-written per-group formulas."""

from __future__ import annotations

import statistics

import pytest
import torch

from nemo_dppo.advantages import broadcast_to_tokens, compute_advantages, dr_grpo, grpo, rloo

REWARDS = [1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 0.5, 2.0]
GROUPS = [7, 7, 7, 3, 3, 3, 3, 42, 9]  # non-contiguous ids; groups 42 and 9 have one sample each


def by_hand(kind: str) -> list[float]:
    out = []
    for i, (r, g) in enumerate(zip(REWARDS, GROUPS, strict=True)):
        group = [x for x, h in zip(REWARDS, GROUPS, strict=True) if h == g]
        if len(group) == 1:
            out.append(0.0)
        elif kind == "dr_grpo":
            out.append(r - statistics.fmean(group))
        elif kind == "grpo":
            out.append((r - statistics.fmean(group)) / (statistics.stdev(group) + 1e-6))
        else:
            others = [x for j, (x, h) in enumerate(zip(REWARDS, GROUPS, strict=True)) if h == g and j != i]
            out.append(r - statistics.fmean(others))
    return out


@pytest.mark.parametrize(("fn", "kind"), [(grpo, "grpo"), (dr_grpo, "dr_grpo"), (rloo, "rloo")])
def test_estimators_match_hand_formulas(fn, kind):
    adv = fn(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    assert adv.tolist() == pytest.approx(by_hand(kind), rel=1e-12, abs=1e-12)
    assert compute_advantages(kind, torch.tensor(REWARDS), torch.tensor(GROUPS)).dtype == torch.float32


def test_uniform_group_has_zero_advantage():
    for fn in (grpo, dr_grpo, rloo):
        assert fn(torch.ones(4), torch.zeros(4, dtype=torch.long)).abs().max().item() == 0.0


def test_rloo_is_scaled_dr_grpo():
    """Leave-one-out baseline = n/(n−1) × (R − group mean)."""
    r, g = torch.randn(12, dtype=torch.float64), torch.arange(12) // 4
    torch.testing.assert_close(rloo(r, g), dr_grpo(r, g) * 4 / 3)


def test_broadcast_and_errors():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask).tolist() == [[2, 2, 0], [-1, 0, 0]]
    with pytest.raises(ValueError, match="expected \\[N\\] and \\[N, T\\]"):
        broadcast_to_tokens(torch.ones(3), mask)
    with pytest.raises(ValueError, match=r"unknown advantage\.estimator 'ppo'; valid: grpo, dr_grpo, rloo"):
        compute_advantages("ppo", torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        grpo(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="expected two \\[N\\] tensors"):
        grpo(torch.ones(2, 2), torch.zeros(2))
