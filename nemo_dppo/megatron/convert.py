"""HF <-> Megatron checkpoint conversion with megatron-bridge; the per-rank work of `tools/convert_*.py`.

A Megatron checkpoint here is a directory

    weights/          megatron-core distributed checkpoint (`torch_dist`): every tensor with its global shape
                      and offsets, so it loads at any TP / EP / ETP / PP layout, not only the one that wrote it
    hf/               the HF config, generation config and tokenizer files of the source model, and the
                      names of its weights (`hf_weight_names.json`, the export needs them)
    conversion.json   what was converted, from where, at which layout

`hf_to_megatron` builds the model at the requested layout with the HF weights (megatron-bridge distributes them
into TP / EP / PP shards) and saves it; `megatron_to_hf` builds the model at its layout from `hf/`, loads
`weights/` and exports HF safetensors (gathering all shards). Both are collective over the job's ranks; only
rank 0 writes the small files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nemo_dppo.config import MegatronConfig
from nemo_dppo.errors import UserError
from nemo_dppo.megatron.hf_export import HF_SIDE_FILES, export_hf_state_dict, hf_weight_names, save_hf_dir
from nemo_dppo.megatron.model import build_policy, read_hf_config

WEIGHTS_DIR = "weights"
HF_DIR = "hf"
META_FILE = "conversion.json"
NAMES_FILE = "hf_weight_names.json"  # in HF_DIR: the HF checkpoint's weight names, for the export


def _layout_dict(layout: MegatronConfig) -> dict[str, int]:
    return {"tp": layout.tp, "ep": layout.ep, "etp": layout.etp, "pp": layout.pp, "dp": layout.data_parallel_size}


def _unwrapped(policy: Any) -> Any:
    module = policy.module
    while hasattr(module, "module"):
        module = module.module
    return module


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, layout: MegatronConfig) -> Path:
    """HF directory → Megatron distributed checkpoint in `out_dir` (collective)."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    read_hf_config(hf_dir)  # one-line errors for a wrong path / architecture, before any collective
    if dist.get_rank() == 0:
        if (out / WEIGHTS_DIR).exists():
            raise UserError(f"{out / WEIGHTS_DIR} already exists; choose an empty output directory")
        (out / WEIGHTS_DIR).mkdir(parents=True)
    dist.barrier()
    policy = build_policy(hf_dir, layout, wrap_with_ddp=False)
    dist_checkpointing.save(_unwrapped(policy).sharded_state_dict(), str(out / WEIGHTS_DIR))
    if dist.get_rank() == 0:
        (out / HF_DIR).mkdir(exist_ok=True)
        for name in HF_SIDE_FILES:
            if (Path(hf_dir) / name).is_file():
                shutil.copyfile(Path(hf_dir) / name, out / HF_DIR / name)
        (out / HF_DIR / NAMES_FILE).write_text(json.dumps(hf_weight_names(policy), indent=1))
        meta = {"format": "megatron-core torch_dist", "source": str(Path(hf_dir).resolve()),
                "written_with_layout": _layout_dict(layout)}  # fmt: skip
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
    dist.barrier()
    return out


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, layout: MegatronConfig) -> Path:
    """Megatron checkpoint written by `hf_to_megatron` → HF directory `out_dir` (collective)."""
    from megatron.core import dist_checkpointing

    src = Path(megatron_dir)
    if not (src / WEIGHTS_DIR).is_dir() or not (src / HF_DIR / "config.json").is_file():
        raise UserError(f"{src} is not a Megatron checkpoint written by convert_hf_to_megatron.py "
                        f"(expected {WEIGHTS_DIR}/ and {HF_DIR}/config.json)")  # fmt: skip
    policy = build_policy(src / HF_DIR, layout, load_weights=False, wrap_with_ddp=False)
    model = _unwrapped(policy)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(src / WEIGHTS_DIR))
    model.load_state_dict(state)
    names = json.loads((src / HF_DIR / NAMES_FILE).read_text())
    weights = export_hf_state_dict(policy, show_progress=dist.get_rank() == 0, weight_names=names)
    if dist.get_rank() == 0:
        save_hf_dir(weights, out_dir, src / HF_DIR)
    dist.barrier()
    return Path(out_dir)
