"""Engines by name: one table each for rollout (μ) and training (π) engines, imported only when chosen.

    engine = make_training_engine(cfg, model_dir)          # `train.backend`: hf | megatron
    rollout = make_rollout_engine(cfg, model_dir, tokenizer, topk)  # `rollout.engine`: hf | vllm

Each engine class has a `from_config` constructor; `nemo-dppo eval --engine` uses the same rollout table.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from nemo_dppo.engines.base import RolloutEngine, TrainingEngine

ROLLOUT_ENGINES: dict[str, str] = {
    "hf": "nemo_dppo.engines.hf_rollout:HFRolloutEngine",
    "vllm": "nemo_dppo.engines.vllm_rollout:VLLMRolloutEngine",
}
TRAINING_ENGINES: dict[str, str] = {
    "hf": "nemo_dppo.engines.hf_training:HFTrainingEngine",
    "megatron": "nemo_dppo.engines.megatron_training:MegatronTrainingEngine",
}


def engine_class(table: dict[str, str], name: str, kind: str) -> Any:
    """The class registered under `name`, imported now; unknown names list the valid ones."""
    try:
        module, cls = table[name].split(":")
    except KeyError:
        raise ValueError(f"unknown {kind} engine {name!r}; valid: {', '.join(sorted(table))}") from None
    return getattr(importlib.import_module(module), cls)


def make_rollout_engine(cfg: Any, model_dir: Path, tokenizer: Any, topk: int) -> RolloutEngine:
    """The `rollout.engine` of a run `Config`, loaded from `model_dir`."""
    return engine_class(ROLLOUT_ENGINES, cfg.rollout.engine, "rollout").from_config(cfg, model_dir, tokenizer, topk)


def make_training_engine(cfg: Any, model_dir: Path) -> TrainingEngine:
    """The `train.backend` of a run `Config`, loaded from `model_dir`."""
    return engine_class(TRAINING_ENGINES, cfg.train.backend, "training").from_config(cfg, model_dir)


__all__ = ["ROLLOUT_ENGINES", "TRAINING_ENGINES", "RolloutEngine", "TrainingEngine", "make_rollout_engine",
           "make_training_engine"]
