"""The trainer's view of a multi-rank job: who is the main rank, and the few collectives the loop needs.

`train.backend=hf` is a one-process job: every method is a no-op. `train.backend=megatron` joins (or, for one
rank, creates) the torch.distributed process group. Rank 0 is the main rank: it owns the rollout engine,
evaluation, logging and checkpoint writing; `share` broadcasts what it produced (the step's rollout batch, the
checkpoint to resume from) and `any` lets all ranks agree on stopping (a preemption signal reaches each rank on
its own; they stop after the same step).

`Job.launch` is the other side: from `nemo-dppo train`, it prepares what only one process may do (the warm
start), checks the model against the layout, and starts the ranks with `nemo_dppo.distributed.spawn`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nemo_dppo.config import Config, to_yaml
from nemo_dppo.errors import UserError

T = TypeVar("T")


@dataclass
class Job:
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # this object initialised torch.distributed (a Megatron job)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def start(cfg: Config) -> Job:
        """Join the job's process group (Megatron backend), or a one-process job."""
        if cfg.train.backend != "megatron":
            return Job()
        from nemo_dppo.megatron import parallel

        parallel.initialize(cfg.train.megatron, cfg.seed)
        return Job(rank=dist.get_rank(), world_size=dist.get_world_size(), distributed=True)

    def share(self, obj: T) -> T:
        """The main rank's `obj` on every rank (pickled broadcast; the others pass anything, e.g. None)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        if self.world_size == 1:
            return flag
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.distributed:
            from nemo_dppo.megatron import parallel

            parallel.shutdown()
            self.distributed = False

    # ----------------------------------------------------------------------------------------- launching
    @staticmethod
    def needs_launch(cfg: Config) -> bool:
        """A multi-rank Megatron layout requested from a process that is not one of the ranks."""
        from nemo_dppo.distributed.spawn import is_launched_rank

        return cfg.train.backend == "megatron" and cfg.train.megatron.world_size > 1 and not is_launched_rank()

    @staticmethod
    def precheck(cfg: Config, initial_model_dir: Callable[[], Path]) -> None:
        """One-line errors before any rank starts (or megatron-core is imported): the policy directory and
        whether the layout divides the model. Prepares the warm start (once, in this process)."""
        from nemo_dppo.distributed.spawn import is_launched_rank
        from nemo_dppo.megatron.model import check_layout, read_hf_config

        if cfg.train.backend != "megatron" or is_launched_rank():  # a launched rank: its launcher checked
            return
        if cfg.model.path is None:  # the tiny policy: check its shapes before spending time on the warm start
            check_layout(_tiny_model_shapes(cfg), cfg.train.megatron)
        if cfg.resume:
            return
        model_dir = initial_model_dir()
        try:
            check_layout(read_hf_config(model_dir), cfg.train.megatron)
        except UserError as err:
            raise UserError(f"cannot load the policy from {model_dir}: {err}") from None

    @staticmethod
    def launch(cfg: Config, _initial_model_dir: Callable[[], Path]) -> dict[str, Any]:
        """Start `cfg.train.megatron.world_size` ranks running the job; returns the main rank's last metrics.

        A failing job exits this process with the failing rank's status (`SystemExit`): rank 0 has already
        printed the one-line error.
        """
        from nemo_dppo.distributed.spawn import spawn
        from nemo_dppo.run_logger import read_metrics

        Job.precheck(cfg, _initial_model_dir)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=".launch-", dir=run_dir, delete=False) as f:
            f.write(to_yaml(cfg))
        config_file = Path(f.name)
        try:
            code = spawn(["-m", "nemo_dppo.launch", "train", str(config_file)], cfg.train.megatron.world_size)
        finally:
            config_file.unlink(missing_ok=True)
        if code != 0:
            raise SystemExit(code)
        records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        return {k: v for k, v in records[-1].items() if k != "step"} if records else {}


def _tiny_model_shapes(cfg: Config) -> dict[str, Any]:
    """The HF config fields `check_layout` reads, for the tiny policy `model:` describes."""
    from nemo_dppo.models.tokenizer import build_tokenizer

    model = cfg.model
    return {
        "vocab_size": len(build_tokenizer()),
        "num_key_value_heads": model.num_kv_heads,
        "num_attention_heads": model.num_heads,
        "num_experts": model.num_experts,
        "num_hidden_layers": model.num_layers,
        "moe_intermediate_size": model.moe_intermediate_size,
    }
