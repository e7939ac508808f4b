"""A `RolloutBatch` → this data-parallel rank's equally shaped micro-batches for megatron-core's schedules.

Every rank of the job holds the same (mini-)batch of N sequences. Data-parallel rank d takes the contiguous rows
`[d·c, (d+1)·c)` with c = ceil(N / DP), in micro-batches of `micro_batch_size` rows. Every rank runs the same
number of equally shaped micro-batches — expert-parallel all-to-alls and pipeline send/recv are collectives — so
the batch is padded with *dummy* rows (copies of row 0 with an empty response mask, zero advantage, no recorded
route): they pass through the model but add nothing to the loss, whose denominators are the real global counts.
The sequence dimension is right-padded to a multiple of the TP size for sequence parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from nemo_dppo.batching import RolloutBatch


@dataclass
class MicroBatch:
    batch: RolloutBatch  # [m, S] rows of the (padded) batch
    rows: torch.Tensor  # [m] row index in the original batch, −1 for dummy rows
    input_ids: torch.Tensor  # [m, S'] right-padded to S' (a multiple of the TP size)
    position_ids: torch.Tensor  # [m, S']
    targets: torch.Tensor  # [m, S'] next token at every position (pad id past the end); the first S − 1 are real

    @property
    def num_targets(self) -> int:
        """S − 1: the target coordinates of the loss tensors."""
        return int(self.batch.input_ids.shape[1]) - 1

    def to(self, device: torch.device) -> MicroBatch:
        """The model inputs and loss tensors on `device`; `rows` and the routes stay on the host (bookkeeping)."""
        if device.type == "cpu":
            return self
        host = {"routes", "route_valid"}
        moved = {
            f.name: getattr(self.batch, f.name).to(device)
            for f in fields(self.batch)
            if getattr(self.batch, f.name) is not None and f.name not in host
        }
        return replace(
            self,
            batch=replace(self.batch, **moved),
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            targets=self.targets.to(device),
        )


def padded_length(seq_len: int, multiple: int) -> int:
    return math.ceil(seq_len / multiple) * multiple


def split_for_rank(
    batch: RolloutBatch,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int | None,
    seq_multiple: int,
    pad_id: int = 0,
    device: torch.device | None = None,
) -> list[MicroBatch]:
    """This rank's micro-batches (the same count and shapes on every rank; see the module docstring)."""
    n = batch.num_sequences
    per_rank = math.ceil(n / dp_size)
    micro = min(micro_batch_size or per_rank, per_rank)
    per_rank = math.ceil(per_rank / micro) * micro
    padded = _pad_rows(batch, per_rank * dp_size)
    rows = torch.arange(per_rank * dp_size)
    rows[n:] = -1
    seq = padded_length(int(batch.input_ids.shape[1]), seq_multiple)
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro):
        part = padded.select(slice(start, start + micro))
        input_ids = torch.full((micro, seq), pad_id, dtype=torch.int64)
        input_ids[:, : part.input_ids.shape[1]] = part.input_ids
        targets = torch.full_like(input_ids, pad_id)
        targets[:, :-1] = input_ids[:, 1:]
        out.append(
            MicroBatch(
                batch=part,
                rows=rows[start : start + micro],
                input_ids=input_ids,
                position_ids=torch.arange(seq).expand(micro, seq).contiguous(),
                targets=targets,
            ).to(device or torch.device("cpu"))
        )
    return out


def _pad_rows(batch: RolloutBatch, total: int) -> RolloutBatch:
    """Append `total − N` dummy rows (row 0 with nothing to learn from) to every tensor of the batch."""
    extra = total - batch.num_sequences
    if extra == 0:
        return batch
    dummy = batch.select(torch.zeros(extra, dtype=torch.int64))
    dummy.response_mask = torch.zeros_like(dummy.response_mask)
    dummy.advantages = torch.zeros_like(dummy.advantages)
    if dummy.route_valid is not None:
        dummy.route_valid = torch.zeros_like(dummy.route_valid)
    return replace(
        batch,
        **{
            f.name: torch.cat([getattr(batch, f.name), getattr(dummy, f.name)])
            for f in fields(batch)
            if getattr(batch, f.name) is not None
        },
    )
