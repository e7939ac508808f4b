"""Process groups for the Megatron training engine: torch.distributed + megatron-core's model-parallel state.

Every rank of a `train.backend=megatron` job calls `initialize(layout, seed)` once. The backend is NCCL when CUDA
is available and gloo otherwise (then `cpu_compat` is applied first). A single process (world 1) that was not
started by a launcher gets a private rendezvous on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_dppo.config import MegatronConfig
from nemo_dppo.errors import UserError
from nemo_dppo.megatron import cpu_compat
from nemo_dppo.megatron.bridge_import import quiet_import_warnings


@dataclass(frozen=True)
class RankCoordinates:
    """Where this process sits in the parallel layout (ranks within each megatron-core group)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def initialize(layout: MegatronConfig, seed: int) -> RankCoordinates:
    """Join (or create, for a lone process) the default process group and build megatron-core's groups."""
    quiet_import_warnings()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_compat.apply()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a lone process: world 1 on a private port
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.get_world_size() != layout.world_size:
        raise UserError(
            f"train.megatron (tp={layout.tp}, pp={layout.pp}, dp={layout.data_parallel_size}) needs "
            f"{layout.world_size} ranks, but {dist.get_world_size()} were started"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )
    # Megatron's RNG tracker states (dropout in TP regions). On CPU they live on the CPU generator: keep the
    # process's own random stream untouched by seeding inside a fork.
    with torch.random.fork_rng(devices=[]):
        model_parallel_cuda_manual_seed(seed)
    return coordinates()


def coordinates() -> RankCoordinates:
    """This rank's coordinates in the (initialised) megatron-core layout."""
    from megatron.core import parallel_state as ps

    return RankCoordinates(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
    )


def shutdown() -> None:
    """Destroy megatron-core's groups and the default process group (tests build several layouts per process)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
