"""Megatron policy → HF weights (megatron-bridge's export), for the rollout engine's weight sync and HF directories.

`export_hf_state_dict` is collective: every rank of the job must call it; every rank gets the full tensors under
HF checkpoint names (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, which transformers loads into its
fused expert layout). `save_hf_dir` writes them as an HF model directory (safetensors + the source directory's
config, generation config and tokenizer files) without megatron-bridge's `save_hf_pretrained`, which would need
nvidia-modelopt.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from nemo_dppo.megatron.model import MegatronPolicy

#: Files copied from the source HF directory next to the exported weights (those that exist).
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def hf_weight_names(policy: MegatronPolicy) -> list[str]:
    """The HF checkpoint's weight names (megatron-bridge orders and filters the export by them)."""
    return sorted(policy.bridge.hf_pretrained.state.source.get_all_keys())


def export_hf_state_dict(
    policy: MegatronPolicy, *, show_progress: bool = False, weight_names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """All weights under HF names, gathered from every TP / EP / PP shard (collective over the whole job).

    A policy built from a config-only directory (no HF weights to read names from) needs `weight_names`.
    """
    tasks = None
    if weight_names is not None:
        names = list(weight_names)
        source = SimpleNamespace(state=SimpleNamespace(source=SimpleNamespace(get_all_keys=lambda: names)))
        tasks = policy.bridge._model_bridge.build_conversion_tasks(source, policy.chunks)
    weights: Iterable = policy.bridge.export_hf_weights(
        policy.chunks, cpu=True, show_progress=show_progress, conversion_tasks=tasks
    )
    return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in weights}


def save_hf_dir(state_dict: dict[str, torch.Tensor], out_dir: str | Path, source_dir: str | Path) -> Path:
    """Write `state_dict` as an HF model directory, with the config and tokenizer files of `source_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in HF_SIDE_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state_dict.values()}
    if len(dtypes) == 1 and (out / "config.json").is_file():  # record the exported dtype, like save_pretrained
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = dtypes.pop()
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
