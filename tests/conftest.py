"""Shared fixtures: a per-session warm-start cache and a tiny, fast run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_dppo.config import Config, load_config

#: Small enough for a few seconds per run on 2 cores; still the full machinery (MoE, bf16 rollout, 2 mini-batches).
TINY_TEST_OVERRIDES = [
    "task.name=arithmetic",  # the default config file (subprocess runs) is the sanity task; these tests are fast
    "eval.k=0",
    "steps=3",
    "eval_every=2",
    "save_every=2",
    "progress=false",
    "model.hidden_size=64",
    "task.num_eval_prompts=8",
    "task.num_digits=1",
    "warm_start.steps=30",
    "rollout.n=4",
    "rollout.max_new_tokens=4",
    "train.prompts_per_step=4",
    "train.mini_batches=2",
    "train.lr=1e-3",
]


@pytest.fixture(scope="module")
def tokenizer():
    """The project's character tokenizer (a module's own `tokenizer` fixture takes precedence)."""
    from nemo_dppo.models.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny Qwen3-MoE with init std 0.2 instead of 0.02: peaked, input-dependent distributions and routes make
    the engine-vs-teacher-forcing tests sharp. Module-scoped: tests that change its weights restore them."""
    from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(TinyMoEConfig(seed=1, initializer_range=0.2), tokenizer)


@pytest.fixture(scope="session")
def warm_start_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warm_start_cache")


@pytest.fixture
def tiny_overrides(tmp_path: Path, warm_start_cache: Path) -> list[str]:
    return [*TINY_TEST_OVERRIDES, f"run_dir={tmp_path / 'run'}", f"warm_start.cache_dir={warm_start_cache}"]


@pytest.fixture
def tiny_config(tiny_overrides: list[str]):
    def make(*extra: str) -> Config:
        return load_config(None, [*tiny_overrides, *extra])

    return make
