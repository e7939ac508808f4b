"""R3 layout for megatron-core's RouterReplay: rollout routes → local token order; missing rows use own routing."""

from __future__ import annotations

import pytest
import torch

from nemo_dppo.megatron import megatron_backend_installed

if not megatron_backend_installed():
    pytest.skip("the Megatron backend needs megatron-core and megatron-bridge", allow_module_level=True)

from nemo_dppo.megatron.routing_replay import MISSING, fallback_replay_class, to_megatron_order


def _routes(batch: int, seq: int, layers: int, k: int) -> torch.Tensor:
    """Route ids that encode their coordinates: 1000·b + 100·s + 10·l + j."""
    b, s, layer, j = torch.meshgrid(*(torch.arange(n) for n in (batch, seq, layers, k)), indexing="ij")
    return 1000 * b + 100 * s + 10 * layer + j


def test_sequence_major_order_sequence_parallel_slices_and_missing_rows():
    routes = _routes(2, 3, 2, 2)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    slices = [
        to_megatron_order(routes, valid, seq_len=4, tp_rank=r, tp_size=2, sequence_parallel=True, layers=range(1, 2))
        for r in range(2)
    ]
    assert [len(s) for s in slices] == [1, 1]  # one tensor per local layer (layer 1 only)
    rank0, rank1 = slices[0][0], slices[1][0]
    assert rank0.shape == rank1.shape == (4, 2)  # [s_local · b, k] with s_local = 2
    # Token order is sequence-major: (s=0, b=0), (s=0, b=1), (s=1, b=0), (s=1, b=1) on TP rank 0.
    assert rank0[:, 0].tolist() == [10, 1010, 110, 1110]
    # TP rank 1 holds positions 2 and 3; (s=2, b=0) was not recorded and s=3 is sequence padding: own routing.
    assert rank1[:, 0].tolist() == [MISSING, 1210, MISSING, MISSING]
    whole = to_megatron_order(routes, None, seq_len=3, tp_rank=0, tp_size=2, sequence_parallel=False, layers=range(2))
    assert whole[0].shape == (6, 2) and whole[0][:, 1].tolist() == [1, 1001, 101, 1101, 201, 1201]


def test_replayed_rows_are_forced_and_missing_rows_use_the_routers_own_topk():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    replay = fallback_replay_class()()
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 0.0, 1.0], [0.0, 0.0, 9.0, 8.0]], requires_grad=True)
    replay.set_target_indices(torch.tensor([[0, 2], [MISSING, MISSING], [1, 3]]))
    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs, used = replay.get_replay_topk(scores, 2, default_compute_topk=lambda s, k, **_: torch.topk(s, k, dim=1))
    assert used.tolist() == [[0, 2], [0, 1], [1, 3]]  # row 1: the router's own top-2
    assert replay.own_topk_idx.tolist() == [[1, 3], [0, 1], [2, 3]]
    assert torch.equal(probs, scores.gather(1, used))
    probs.sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0  # the router still gets gradients
    RouterReplay.clear_global_router_replay_instances()
