"""Checkpoints of the Megatron engine: the `hf` engine's layout and atomicity, plus one shard per rank.

    step_NNNNNN/model/                 HF export of the policy (safetensors + config + tokenizer), for evaluation
    step_NNNNNN/megatron/rank_RRRRR.pt this rank's model shard, megatron-core optimizer state (fp32 main
                                       parameters, Adam moments, fp16 loss scale) and RNG state
    step_NNNNNN/megatron/layout.json   the parallel layout and precision the shards were written with
    step_NNNNNN/train.pt, trainer_state.json, config.yaml, manifest.json, COMPLETE   as for the `hf` engine

Every `.pt` holds tensors, numbers, strings, lists and dicts only and is loaded with `weights_only=True`; the
manifest (written by `CheckpointManager.publish`) covers the shards too.

The save is collective. Rank 0 creates the temporary directory and shares its name; every rank writes and
fsyncs its shard; all ranks export the HF weights (a collective); rank 0 writes the rest, the COMPLETE marker,
renames the directory into place and replaces `latest` atomically — `CheckpointManager`'s protocol — so a crash
at any point leaves the previous `latest` intact. A write that fails on any rank (e.g. a full disk) removes the
partial directory and raises the same one-line `UserError` on every rank. Resuming needs the same layout
(checked, one-line error); to change the layout, convert the `model/` export with `tools/convert_hf_to_megatron.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_dppo.checkpoint import TRAIN_FILE, CheckpointManager, TrainerState, checkpoint_write_error, rng_state
from nemo_dppo.errors import UserError
from nemo_dppo.megatron.hf_export import save_hf_dir
from nemo_dppo.safe_load import load_json, load_tensor_file

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
        failure = _agree(_attempt(_write_shard, tmp, rank, engine))
        if failure is None:
            weights = engine.hf_state_dict()  # collective
            dist.barrier()
            mine = None
            if rank == 0 and manager is not None:
                mine = _attempt(_write_rank0_files, tmp, engine, weights, tokenizer, extra) or _attempt(
                    manager.publish, tmp, state, config_yaml
                )
            failure = _agree(mine, src=0)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_write_error(root, state.step, OSError(*failure))
    return final


def _attempt(write: Callable[..., Any], *args: Any) -> OSError | None:
    """Run one write; its `OSError` (e.g. a full disk) is returned, for all ranks to agree on."""
    try:
        write(*args)
    except OSError as err:
        return err
    return None


def _agree(failure: OSError | None, src: int | None = None) -> tuple[int, str] | None:
    """(errno, message) of the first failure over the ranks (or of rank `src`), the same on every rank."""
    mine = None if failure is None else (failure.errno or 0, failure.strerror or str(failure))
    if src is not None:
        box = [mine]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return next((f for f in gathered if f is not None), None)


def _write_shard(tmp: Path, rank: int, engine: Any) -> None:
    """This rank's shard (model, optimizer, RNG), fsync'd."""
    shard = shard_file(tmp, rank)
    shard.parent.mkdir(parents=True, exist_ok=True)
    torch.save(engine.shard_state(), shard)
    with open(shard, "rb") as f:
        os.fsync(f.fileno())


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
    torch.save({"rng": rng_state(), **(extra or {})}, tmp / TRAIN_FILE)


def load_shard(checkpoint: Path, engine: Any) -> None:
    """Restore this rank's shard into `engine` (same layout required)."""
    layout_file = checkpoint / SHARD_DIR / LAYOUT_FILE
    if not layout_file.is_file():
        raise UserError(
            f"checkpoint {checkpoint} has no Megatron shards ({SHARD_DIR}/); it was written by another backend"
        )
    written = load_json(layout_file)
    current = engine.layout_description()
    if written != current:
        raise UserError(
            f"checkpoint {checkpoint} was written with {written}, this run uses {current}; resume with the same "
            "layout, or convert its model/ directory with tools/convert_hf_to_megatron.py"
        )
    shard = shard_file(checkpoint, dist.get_rank())
    engine.load_shard_state(load_tensor_file(shard))
