"""The Megatron training backend (`train.backend=megatron`): megatron-core 0.16.1 + megatron-bridge 0.3.1.

Nothing here imports megatron at package import time; each module does so when used.

    bridge_import.py   import megatron-bridge without TransformerEngine / triton
    bridge_compat.py   three fixes to megatron-bridge 0.3.1's conversion for the local layer spec
    cpu_compat.py      the CPU work-arounds for megatron-core, applied only when no CUDA device exists
    parallel.py        process groups (gloo / NCCL) and megatron-core's model-parallel state
    model.py           the GPT/MoE policy from an HF Qwen3-MoE directory via the bridge's provider
    optimizer.py       megatron-core's optimizer (AdamW, clipping, fp16 dynamic loss scaling)
    microbatches.py    a rollout batch → this data-parallel rank's micro-batches
    routing_replay.py  R3 with megatron-core's native RouterReplay (routes in local token order)
    hf_export.py       Megatron → HF weights (weight sync, HF directories)
    checkpoint_io.py   the engine's sharded, atomic checkpoints
    convert.py         HF <-> Megatron distributed checkpoints (tools/convert_*.py; CLI in convert_cli.py)
    job.py             the trainer's view of a multi-rank job; launching it
    parity.py          one DPPO step on the Megatron engine against the `hf` engine
"""

from __future__ import annotations

import importlib.util


def megatron_backend_installed() -> bool:
    """Whether megatron-core and megatron-bridge are installed (checked without importing them)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("megatron.core", "megatron.bridge"))
    except ModuleNotFoundError:  # no `megatron` package at all
        return False
