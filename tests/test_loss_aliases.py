"""Other frameworks' loss-mode names (verl, Stable-RL, NeMo-RL PR #4069): resolution, one-line messages, same loss."""

from __future__ import annotations

import logging

import pytest
import torch

from nemo_dppo.config import ConfigError, load_config
from nemo_dppo.losses import LOSS_MODES, LossConfig, PolicyLossInput, compute_policy_loss
from nemo_dppo.losses.aliases import ALIASES, resolve_mode_name
from nemo_dppo.nemo_rl.loss_settings import LossSettingsError, loss_settings

#: The table documented in the README ("Coming from another framework"): foreign name → our mode.
DOCUMENTED = {
    "dppo_tv": "dppo_binary_tv",  # verl PR #5397
    "dppo_kl": "dppo_binary_kl",
    "vanilla": "ppo_clip",  # verl's PPO clip
    "dppo_binary_tv_recompute": "dppo_binary_tv_decoupled",  # Stable-RL
    "dppo_binary_kl_recompute": "dppo_binary_kl_decoupled",
    "ppo": "ppo_clip",
    "ppo_recompute": "minirl",
    "pg_no_mask": "pg_is",
}
SAME_NAME = ("dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl")  # NeMo-RL #4069, Stable-RL


def random_batch(seed: int = 0, b: int = 4, t: int = 9, k: int = 3) -> PolicyLossInput:
    g = torch.Generator().manual_seed(seed)
    log_mu = torch.rand(b, t, generator=g).clamp(min=1e-3).log()
    log_pi = (log_mu + 0.4 * torch.randn(b, t, generator=g)).clamp(max=-1e-4).requires_grad_()
    log_old = (log_mu + 0.2 * torch.randn(b, t, generator=g)).clamp(max=-1e-4)
    topk_mu = torch.softmax(torch.randn(b, t, k + 2, generator=g), -1)[..., :k].log()
    topk_pi = torch.softmax(torch.randn(b, t, k + 2, generator=g), -1)[..., :k].log()
    mask = (torch.arange(t)[None] < torch.tensor([t, t - 2, 3, 1])[:, None]).float()
    adv = torch.randn(b, generator=g)
    return PolicyLossInput(log_pi, log_mu, adv, mask, log_old, topk_mu, topk_pi)


def test_the_table_is_the_documented_one_and_maps_to_registered_modes() -> None:
    assert {name: mode for name, (mode, _) in ALIASES.items()} == DOCUMENTED
    assert set(DOCUMENTED.values()) <= set(LOSS_MODES)
    assert not set(ALIASES) & set(LOSS_MODES)  # an alias never shadows one of our names
    assert set(SAME_NAME) <= set(LOSS_MODES)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_alias_gives_the_loss_and_gradient_of_its_mode(name: str) -> None:
    alias_cfg, canonical_cfg = LossConfig(mode=name), LossConfig(mode=DOCUMENTED[name])
    assert alias_cfg.mode == DOCUMENTED[name]
    results = []
    for cfg in (alias_cfg, canonical_cfg):
        inputs = random_batch()
        loss, metrics = compute_policy_loss(inputs, cfg)
        loss.backward()
        results.append((loss.detach(), inputs.logprobs.grad, metrics))
    (loss_a, grad_a, metrics_a), (loss_c, grad_c, metrics_c) = results
    assert torch.equal(loss_a, loss_c) and torch.equal(grad_a, grad_c)
    assert metrics_a == metrics_c
    assert grad_a.abs().sum() > 0  # a real batch, not an all-masked one


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_alias_logs_one_line_naming_the_mode(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nemo_dppo.losses.aliases"):
        mode, note = resolve_mode_name(name)
    assert mode == DOCUMENTED[name]
    assert [r.getMessage() for r in caplog.records] == [note]
    assert note is not None and "\n" not in note and repr(name) in note and repr(mode) in note


@pytest.mark.parametrize("name", [*sorted(LOSS_MODES), "no_such_mode"])
def test_our_names_and_unknown_names_pass_through_silently(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_mode_name(name) == (name, None)
    assert not caplog.records


def test_unknown_name_is_one_line_listing_ours_and_the_aliases() -> None:
    with pytest.raises(ValueError) as err:
        LossConfig(mode="grpo_clip")
    message = str(err.value)
    assert "\n" not in message and "'grpo_clip'" in message
    assert all(name in message for name in [*LOSS_MODES, *ALIASES])


def test_our_config_accepts_an_alias_and_stores_our_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nemo_dppo.losses.aliases"):
        cfg = load_config(None, ["loss.mode=ppo_recompute"])
    assert cfg.loss.mode == "minirl"
    assert len(caplog.records) == 1 and "'minirl'" in caplog.records[0].getMessage()
    with pytest.raises(ConfigError, match=r"other frameworks' names: .*vanilla"):
        load_config(None, ["loss.mode=dppo_tvv"])


def test_nemo_rl_loss_mode_key(caplog: pytest.LogCaptureFixture) -> None:
    assert loss_settings({"loss_mode": "dppo_binary_tv"}).core.mode == "dppo_binary_tv"  # NeMo-RL PR #4069
    with caplog.at_level(logging.WARNING, logger="nemo_dppo.losses.aliases"):
        both = loss_settings({"loss_mode": "dppo_tv", "mode": "dppo_binary_tv"})
    assert both.core.mode == "dppo_binary_tv" and len(caplog.records) == 1
    assert loss_settings({"mode": "pg_no_mask"}).core.mode == "pg_is"
    assert loss_settings({"loss_mode": "dppo_topk_kl", "topk": 4}).topk == 4


def test_nemo_rl_loss_mode_and_mode_disagreeing_is_one_line() -> None:
    with pytest.raises(LossSettingsError) as err:
        loss_settings({"loss_mode": "dppo_kl", "mode": "dppo_binary_tv"})
    message = str(err.value)
    assert "\n" not in message and "loss_fn.mode" in message and "loss_fn.loss_mode" in message
    with pytest.raises(LossSettingsError, match=r"unknown loss_fn\.mode 'ppo_clipp'.*other frameworks' names"):
        loss_settings({"loss_mode": "ppo_clipp"})
