"""Checkpoints of the Megatron engine: the `hf` engine's layout and atomicity, plus one shard per rank.

    step_NNNNNN/model/                 HF export of the policy (safetensors + config + tokenizer), for evaluation
    step_NNNNNN/megatron/rank_RRRRR.pt this rank's model shard, megatron-core optimizer state (fp32 main
                                       parameters, Adam moments, fp16 loss scale) and RNG state
    step_NNNNNN/megatron/layout.json   the parallel layout and precision the shards were written with
    step_NNNNNN/train.pt, trainer_state.json, config.yaml, COMPLETE   as written by the `hf` engine

The save is collective. Rank 0 creates the temporary directory and shares its name; every rank writes and
fsyncs its shard; all ranks export the HF weights (a collective); rank 0 writes the rest, the COMPLETE marker,
renames the directory into place and replaces `latest` atomically — `CheckpointManager`'s protocol — so a crash
at any point leaves the previous `latest` intact. Resuming needs the same layout (checked, one-line error);
to change the layout, convert the `model/` export with `tools/convert_hf_to_megatron.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_dppo.checkpoint import (
    CheckpointManager,
    TrainerState,
    rng_state,
)
from nemo_dppo.errors import UserError
from nemo_dppo.megatron.hf_export import save_hf_dir

SHARD_DIR = "megatron"
LAYOUT_FILE = "layout.json"


def shard_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / SHARD_DIR / f"rank_{rank:05d}.pt"


def save_sharded(
    manager: CheckpointManager | None,
    root: Path,
    state: TrainerState,
    engine: Any,
    tokenizer: Any,
    config_yaml: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective save of a Megatron-engine checkpoint (see the module docstring); `manager` only on rank 0."""
    rank = dist.get_rank()
    if rank == 0 and (manager is None or manager.root != root):
        raise ValueError(f"save_sharded: rank 0 needs the CheckpointManager of {root}")
    final = root / f"step_{state.step:06d}"
    box = [str(manager.new_tmp_dir()) if manager is not None and rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(str(box[0]))
    try:
        shard = shard_file(tmp, rank)
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save(engine.shard_state(), shard)
        with open(shard, "rb") as f:
            os.fsync(f.fileno())
        weights = engine.hf_state_dict()  # collective
        dist.barrier()
        if rank == 0 and manager is not None:
            _write_rank0_files(tmp, engine, weights, tokenizer, extra)
            manager.publish(tmp, state, config_yaml)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def _write_rank0_files(
    tmp: Path,
    engine: Any,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    extra: dict[str, Any] | None,
) -> None:
    save_hf_dir(weights, tmp / "model", engine.hf_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    (tmp / SHARD_DIR / LAYOUT_FILE).write_text(json.dumps(engine.layout_description(), indent=2))
    torch.save({"rng": rng_state(), **(extra or {})}, tmp / "train.pt")


def load_shard(checkpoint: Path, engine: Any) -> None:
    """Restore this rank's shard into `engine` (same layout required)."""
    layout_file = checkpoint / SHARD_DIR / LAYOUT_FILE
    if not layout_file.is_file():
        raise UserError(
            f"checkpoint {checkpoint} has no Megatron shards ({SHARD_DIR}/); it was written by another backend"
        )
    written = json.loads(layout_file.read_text())
    current = engine.layout_description()
    if written != current:
        raise UserError(
            f"checkpoint {checkpoint} was written with {written}, this run uses {current}; resume with the same "
            "layout, or convert its model/ directory with tools/convert_hf_to_megatron.py"
        )
    shard = shard_file(checkpoint, dist.get_rank())
    engine.load_shard_state(torch.load(shard, weights_only=False))
