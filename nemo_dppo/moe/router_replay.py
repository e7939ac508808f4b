"""R3 (rollout router replay, spec "R3") for HF Qwen3-MoE models, with forward hooks only.

In transformers 5.x each sparse MoE block (`layers[i].mlp`) owns a router `mlp.gate` whose forward takes the
flattened hidden states `[B*S, H]` and returns `(router_logits [B*S, E], router_scores [B*S, k],
router_indices [B*S, k])`; the block feeds only scores and indices to the experts. A forward hook on the
router can therefore read the chosen experts (record) or replace scores and indices (replay).

Routes layout (the convention every helper here uses):
  routes[b, s, l, j]  int64 expert id; `b` batch row; `s` position in the forwarded `[B, S]` input (padded
                      coordinates, padding positions included); `l` the l-th MoE layer in model order;
                      `j` the j-th of the k experts in the router's top-k order (descending probability).
Rows at padding positions are meaningless: the caller keeps the valid ones (a `[B, S]` mask). During
`generate` with left-padded prompts, prefill and every decode step are concatenated along `s`, giving
`[B, P_max + G - 1, L, k]` (the last generated token is never forwarded); sample b's rows are
`[P_max - P_b : P_max + T_b - 1]`, i.e. `[P_b + T_b - 1, L, k]` (`RolloutSample.routed_experts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of `model` in layer order (modules with a `gate` router and `experts`)."""
    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m.gate, "top_k")]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks with an `mlp.gate` router")
    return blocks


def routes_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num MoE layers L, experts per token k, num experts E)."""
    blocks = moe_blocks(model)
    gate = blocks[0].gate
    return len(blocks), int(gate.top_k), int(gate.num_experts)


class _RouterHooks:
    """Installs a shape-capturing pre-hook on every MoE block and an output hook on its router."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = moe_blocks(model)
        self.num_layers = len(self.blocks)
        self.top_k = int(self.blocks[0].gate.top_k)
        self.num_experts = int(self.blocks[0].gate.num_experts)
        self._shapes: list[tuple[int, int] | None] = [None] * self.num_layers
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active")
        for layer, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(layer)))
            self._handles.append(block.gate.register_forward_hook(self._make_gate_hook(layer)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_pre_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0]
            self._shapes[layer] = (int(hidden.shape[0]), int(hidden.shape[1]))

        return hook

    def _make_gate_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            shape = self._shapes[layer]
            if shape is None:
                raise RuntimeError("MoE router called outside its MoE block; cannot infer [B, S]")
            return self._on_route(layer, shape, output)

        return hook

    def _on_route(self, layer: int, shape: tuple[int, int], output: Any) -> Any:
        raise NotImplementedError


class RouterRecorder(_RouterHooks):
    """Records the router's own top-k choice at every forward, per MoE layer.

    Usage: `with RouterRecorder(model) as rec: model.generate(...)`; then `rec.routes()` is
    `[B, S_total, L, k]` (all forwards of the context concatenated along `s`: prefill + each decode step).
    For a single teacher-forced forward it is that forward's `[B, S, L, k]`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._calls: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self._calls = [[] for _ in range(self.num_layers)]

    @property
    def num_calls(self) -> int:
        """Number of forwards recorded (per layer)."""
        return len(self._calls[0])

    def _on_route(self, layer: int, shape: tuple[int, int], output: Any) -> Any:
        indices = output[2]
        self._calls[layer].append(indices.detach().reshape(shape[0], shape[1], -1).to(torch.int64))
        return output

    def routes(self) -> torch.Tensor:
        """Everything recorded, stitched to `[B, S_total, L, k]` int64."""
        if self.num_calls == 0:
            raise RuntimeError("no forward was recorded")
        per_layer = [torch.cat(calls, dim=1) for calls in self._calls]
        return torch.stack(per_layer, dim=2)


class RouterReplay(_RouterHooks):
    """Forces the experts of a teacher-forced forward over `[B, S]` to `routes` `[B, S, L, k]` (R3).

    The router still computes its logits (so `mlp.gate.weight` gets gradients); gate weights are the softmax
    of those logits gathered at the forced experts, renormalised when the router has `norm_topk_prob`.
    What the router would have chosen is recorded: `own_routes()` gives `[B, S, L, k]` for the latest forward.
    Keep the backward pass inside the context when gradient checkpointing recomputes the forward.
    """

    def __init__(self, model: nn.Module, routes: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self._routes: torch.Tensor | None = None
        self._own: list[torch.Tensor | None] = [None] * self.num_layers
        if routes is not None:
            self.set_routes(routes)

    def set_routes(self, routes: torch.Tensor) -> None:
        """Routes `[B, S, L, k]` for the next forward(s)."""
        expected = (self.num_layers, self.top_k)
        if routes.dim() != 4 or tuple(routes.shape[2:]) != expected:
            raise ValueError(f"routes must be [B, S, {expected[0]}, {expected[1]}], got {tuple(routes.shape)}")
        if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= self.num_experts):
            raise ValueError(f"routes hold expert ids outside [0, {self.num_experts})")
        self._routes = routes.to(torch.int64)
        self._own = [None] * self.num_layers

    def _on_route(self, layer: int, shape: tuple[int, int], output: Any) -> Any:
        if self._routes is None:
            raise RuntimeError("RouterReplay has no routes: call set_routes() first")
        logits, _scores, own = output
        if tuple(self._routes.shape[:2]) != shape:
            raise ValueError(f"replay routes are for [B, S]={tuple(self._routes.shape[:2])}, forward got {shape}")
        self._own[layer] = own.detach().reshape(shape[0], shape[1], -1).to(torch.int64)
        forced = self._routes[:, :, layer, :].reshape(-1, self.top_k).to(logits.device)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights = probs.gather(-1, forced)
        if getattr(self.blocks[layer].gate, "norm_topk_prob", True):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), forced

    def own_routes(self) -> torch.Tensor:
        """What the model's own routers chose in the latest replayed forward, `[B, S, L, k]` int64."""
        if any(own is None for own in self._own):
            raise RuntimeError("no replayed forward has run since the routes were set")
        return torch.stack([own for own in self._own if own is not None], dim=2)

    def disagreement(self, valid: torch.Tensor | None = None) -> float:
        """Fraction of valid token-layer routes whose own top-k set differs from the replayed one."""
        if self._routes is None:
            raise RuntimeError("RouterReplay has no routes")
        return routing_disagreement(self.own_routes(), self._routes, valid)


def routing_disagreement(own: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fraction of token-layer routes (`[B, S, L, k]`) whose expert SETS differ, over `valid` `[B, S]`."""
    if own.shape != reference.shape:
        raise ValueError(f"route shapes differ: {tuple(own.shape)} vs {tuple(reference.shape)}")
    same = (own.sort(dim=-1).values == reference.to(own.device).sort(dim=-1).values).all(dim=-1)  # [B, S, L]
    if valid is not None:
        same = same[valid.to(device=same.device, dtype=torch.bool)]
    if same.numel() == 0:
        return 0.0
    return 1.0 - same.float().mean().item()


def collate_routes(
    routes: Sequence[torch.Tensor],
    seq_len: int,
    offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place per-sample routes `[n_b, L, k]` into a `[B, seq_len, L, k]` batch for `RouterReplay`.

    Sample b's rows start at position `offsets[b]` (default 0: right padding). Every other row (padding,
    and the final token that the rollout never forwarded) is filled with `arange(k)`: a valid,
    duplicate-free route.
    Returns `(routes, valid)` where `valid` `[B, seq_len]` is True at rows that came from a sample.
    """
    if not routes:
        raise ValueError("no routes to collate")
    num_layers, top_k = int(routes[0].shape[1]), int(routes[0].shape[2])
    batch = torch.arange(top_k, dtype=torch.int64).expand(len(routes), seq_len, num_layers, top_k).clone()
    valid = torch.zeros(len(routes), seq_len, dtype=torch.bool)
    for b, r in enumerate(routes):
        start = 0 if offsets is None else int(offsets[b])
        if r.dim() != 3 or tuple(r.shape[1:]) != (num_layers, top_k):
            raise ValueError(f"sample {b}: routes must be [n, {num_layers}, {top_k}], got {tuple(r.shape)}")
        if start < 0 or start + r.shape[0] > seq_len:
            raise ValueError(f"sample {b}: {r.shape[0]} rows at offset {start} do not fit in seq_len {seq_len}")
        batch[b, start : start + r.shape[0]] = r.to(torch.int64)
        valid[b, start : start + r.shape[0]] = True
    return batch, valid
