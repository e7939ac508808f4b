"""R3 on the Megatron backend with megatron-core's native `RouterReplay` (spec "R3").

The rollout records per sequence `[T, L, k]` expert ids; `RolloutBatch.routes` holds them as `[N, S, L, k]` in
sequence coordinates with `route_valid` `[N, S]`. megatron-core's router sees this rank's tokens as a flat
`[s_local · b, ...]` list in **sequence-major** order (`[s, b]` flattened), where `s_local` is this TP rank's
slice of the sequence under sequence parallelism; a rank holds the routers of its pipeline stage's layers only,
in layer order (`RouterReplay.global_router_replay_instances`). `to_megatron_order` builds exactly that list.

Rows the rollout did not record (padding, the never-forwarded last token) are marked −1 and fall back to the
model's own routing: `FallbackRouterReplay` (installed on every router instance) takes the router's top-k there.
It also remembers, per forward, the experts the router itself would pick (`own`) and the ones the forward used
(`used`), so the routing disagreement with the rollout is measured as on the `hf` backend. The router keeps
computing its logits, so it gets gradients; gate weights are the softmax over the replayed experts' logits
(post-softmax top-k) or the full softmax gathered at them (pre-softmax), like the HF router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MISSING = -1


def _router_replay_classes() -> tuple[Any, Any]:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    return RouterReplay, RouterReplayAction


def install_fallback_replay() -> list[Any]:
    """Turn this rank's `RouterReplay` instances (one per local MoE layer, in order) into `FallbackRouterReplay`."""
    router_replay, _ = _router_replay_classes()
    cls = fallback_replay_class()
    for instance in router_replay.global_router_replay_instances:
        instance.__class__ = cls
        instance.used_topk_idx = None
        instance.own_topk_idx = None
    return list(router_replay.global_router_replay_instances)


_FALLBACK_CLASS: Any = None


def fallback_replay_class() -> Any:
    """`RouterReplay` whose replayed rows marked −1 use the router's own top-k; records own and used experts."""
    global _FALLBACK_CLASS
    if _FALLBACK_CLASS is not None:
        return _FALLBACK_CLASS
    router_replay, action_enum = _router_replay_classes()

    class FallbackRouterReplay(router_replay):
        used_topk_idx: torch.Tensor | None
        own_topk_idx: torch.Tensor | None

        def get_replay_topk(
            self,
            scores: torch.Tensor,
            topk: int,
            num_groups: int | None = None,
            group_topk: int | None = None,
            default_compute_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert default_compute_topk is not None
            own_probs, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            self.own_topk_idx = own.detach()
            if self.router_replay_action == action_enum.REPLAY_FORWARD:
                target = self.target_topk_idx
            elif self.router_replay_action == action_enum.REPLAY_BACKWARD:
                target = self.replay_backward_list.pop(0)
            else:  # RECORD or no action: the model's own routing
                if self.router_replay_action == action_enum.RECORD:
                    self.record_indices(own)
                self.used_topk_idx = own.detach()
                return own_probs, own
            target = target.to(scores.device)
            if tuple(target.shape) != tuple(own.shape):
                raise ValueError(f"replay routes {tuple(target.shape)} do not match the router's {tuple(own.shape)}")
            missing = target[:, :1] < 0
            used = torch.where(missing, own, target)
            self.used_topk_idx = used.detach()
            return scores.gather(1, used), used

    _FALLBACK_CLASS = FallbackRouterReplay
    return FallbackRouterReplay


def to_megatron_order(
    routes: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    seq_len: int,
    tp_rank: int,
    tp_size: int,
    sequence_parallel: bool,
    layers: range,
) -> list[torch.Tensor]:
    """Routes `[b, S, L, k]` (+ `valid` `[b, S]`) → one `[s_local · b, k]` tensor per local layer in `layers`.

    The sequence is padded to `seq_len` (missing rows), invalid rows become −1 (own routing), then the tokens are
    put in sequence-major order and, under sequence parallelism, cut to this TP rank's contiguous slice.
    """
    b, s = routes.shape[:2]
    if seq_len < s:
        raise ValueError(f"seq_len {seq_len} is shorter than the routes' {s} positions")
    padded = torch.full((b, seq_len, *routes.shape[2:]), MISSING, dtype=torch.int64)
    padded[:, :s] = routes.to(torch.int64)
    if valid is not None:
        padded[:, :s][~valid.to(torch.bool)] = MISSING
    seq_major = padded.transpose(0, 1)  # [S', b, L, k]
    if sequence_parallel and tp_size > 1:
        chunk = seq_len // tp_size
        seq_major = seq_major[tp_rank * chunk : (tp_rank + 1) * chunk]
    return [seq_major[:, :, layer].reshape(-1, routes.shape[-1]).contiguous() for layer in layers]


class ReplayControl:
    """Sets what every local router does in the next forward(s): replay given routes, or record its own."""

    def __init__(self, instances: list[Any]) -> None:
        self.instances = instances
        _, self._action = _router_replay_classes()

    def replay(self, per_layer: list[torch.Tensor]) -> None:
        if len(per_layer) != len(self.instances):
            raise ValueError(f"{len(per_layer)} replay tensors for {len(self.instances)} local MoE layers")
        for instance, target in zip(self.instances, per_layer, strict=True):
            instance.set_target_indices(target)
            instance.set_router_replay_action(self._action.REPLAY_FORWARD)

    def record(self) -> None:
        for instance in self.instances:
            instance.set_router_replay_action(self._action.RECORD)

    def clear(self) -> None:
        """Forget targets and records (after every step, as megatron-core requires)."""
        for instance in self.instances:
            instance.clear_indices()
            instance.clear_router_replay_action()

    def used(self) -> list[torch.Tensor]:
        """Experts each local router used in the latest forward, `[tokens, k]` on the host."""
        return [instance.used_topk_idx.cpu() for instance in self.instances]

    def own(self) -> list[torch.Tensor]:
        """Experts each local router itself picked in the latest forward, `[tokens, k]` on the host."""
        return [instance.own_topk_idx.cpu() for instance in self.instances]


def disagreement_counts(chosen: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[int, int]:
    """(token-layer routes whose expert SET differs, routes compared), over rows the reference recorded (≥ 0)."""
    differ = total = 0
    for mine, ref in zip(chosen, reference, strict=True):
        recorded = ref[:, 0] >= 0
        same = (mine.sort(dim=-1).values == ref.sort(dim=-1).values).all(dim=-1)
        differ += int((~same & recorded).sum())
        total += int(recorded.sum())
    return differ, total
