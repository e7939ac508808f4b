"""Config loading: YAML + defaults inheritance + Hydra-grammar overrides + presets, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_dppo.config import CONF_DIR, Config, ConfigError, load_config, to_yaml

LOSS_PRESETS = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))


def test_base_config_is_the_papers_dppo_binary_tv():
    cfg = load_config(CONF_DIR / "base.yaml")
    assert cfg.loss.mode == "dppo_binary_tv" and cfg.loss.deltas("tv") == (0.15, 0.15)
    assert cfg.loss.ratio_cap == 1e4 and cfg.advantage.estimator == "dr_grpo"
    assert cfg.train.lr == 1e-6 and cfg.train.mini_batches == 8


def test_paper_loss_presets_exist():
    expected = {"dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl", "grpo", "grpo_clip_higher",
                "cispo", "pg_is", "minirl"}  # fmt: skip
    assert expected <= set(LOSS_PRESETS)


@pytest.mark.parametrize("preset", LOSS_PRESETS)
def test_every_loss_preset_loads_as_an_override(preset):
    cfg = load_config(CONF_DIR / "base.yaml", [f"loss={preset}"])
    assert isinstance(cfg, Config)
    if "topk" in preset:
        assert cfg.rollout.logprobs_topk == 20


def test_grpo_presets_values():
    assert load_config(None, ["loss=grpo"]).loss.clip_high == 0.2
    cfg = load_config(None, ["loss=grpo_clip_higher"])
    assert (cfg.loss.mode, cfg.loss.clip_low, cfg.loss.clip_high) == ("ppo_clip", 0.2, 0.28)


def test_overrides_types_and_lists():
    cfg = load_config(None, ["train.lr=3e-5", "loss.dual_clip=3", "task.ops=[+,-]", "loss.delta_low=null"])
    assert cfg.train.lr == 3e-5 and cfg.loss.dual_clip == 3.0 and cfg.task.ops == ["+", "-"]
    assert cfg.loss.delta_low is None


def test_defaults_inheritance(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text("loss:\n  mode: dppo_binary_kl\ntrain:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("defaults: [parent.yaml]\ntrain:\n  lr: 0.25\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.loss.mode == "dppo_binary_kl" and cfg.train.lr == 0.25
    (tmp_path / "loop.yaml").write_text("defaults: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.modee=x"], "unknown key 'loss.modee' — did you mean 'mode'\\? valid keys in 'loss': mode, "),
        (["trian.lr=1"], "did you mean 'train'"),
        (["train.lr=fast"], "train.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
        (["loss.mode=ppo_typo"], "unknown loss.mode 'ppo_typo'; valid modes"),
        (["loss=nope"], "available loss presets: cispo, dppo_binary_kl"),
        (["rollout.dtype=int8"], "rollout.dtype='int8' is not one of fp32, bf16, fp16"),
        (["rollout.n=3", "train.prompts_per_step=3"], "not divisible by train.mini_batches=8"),
        (["train.lr"], "cannot parse override"),
        (["~train.lr"], "only plain key=value"),
    ],
)
def test_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_yaml_round_trip(tmp_path: Path):
    cfg = load_config(None, ["loss=dppo_topk_kl", "seed=5"])
    (tmp_path / "saved.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "saved.yaml") == cfg
