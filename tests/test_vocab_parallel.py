"""Vocab-parallel log π / Top-K / entropy (nemo_dppo/distributed/vocab_parallel.py) against a float64 reference.

The reference is the textbook full-vocabulary computation in float64: log_softmax(logits / T), gather, autograd.
Tensor parallelism is exercised with real gloo process groups (TP = 1, 2, 4 processes on 127.0.0.1, plus two TP = 2
groups inside a world of 4), each rank holding its contiguous slice of the vocabulary.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_dppo.distributed.memory import TensorMemoryMeter
from nemo_dppo.distributed.vocab_parallel import vocab_parallel_logprobs
from nemo_dppo.logprobs import gather_logprobs

VOCAB = 96  # divisible by 1, 2, 4
TOKENS = (3, 13)  # 39 tokens: odd chunk sizes leave ragged last chunks
K = 6


@dataclass
class Case:
    logits: torch.Tensor  # [*TOKENS, VOCAB] full vocabulary
    targets: torch.Tensor  # [*TOKENS] sampled ids
    topk: torch.Tensor  # [*TOKENS, K] rollout's Top-K ids (sampled id swapped into slot K when outside)
    weights: torch.Tensor  # [*TOKENS] d loss / d log π(target), float64


def make_case(seed: int, dtype: torch.dtype, tokens: tuple[int, ...] = TOKENS, vocab: int = VOCAB) -> Case:
    """Logits with a spread of confident and flat rows; ids sampled from them, Top-K from a perturbed copy (μ ≠ π)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*tokens, vocab, generator=g, dtype=torch.float64) * 3
    peaked = torch.rand(*tokens, generator=g) < 0.3
    logits[..., 7 % vocab] += peaked * 25.0  # near-one-hot rows (π ≈ 1): the lse must not lose the other terms
    logits = logits.to(dtype)
    probs = torch.softmax(logits.double().reshape(-1, vocab), -1)
    targets = torch.multinomial(probs, 1, generator=g).reshape(tokens)
    rollout = logits.double() + torch.randn(*tokens, vocab, generator=g, dtype=torch.float64) * 0.5
    topk = rollout.topk(K, dim=-1).indices
    missing = ~(topk == targets[..., None]).any(-1)
    topk[..., -1] = torch.where(missing, targets, topk[..., -1])
    return Case(logits, targets, topk, torch.randn(*tokens, generator=g, dtype=torch.float64))


def reference(case: Case, temperature: float) -> dict[str, torch.Tensor]:
    """Full-vocabulary float64: log_softmax + gather, entropy −Σ π log π, autograd gradient of Σ w·log π(target)."""
    logits = case.logits.detach().double().requires_grad_(True)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    picked = logp.gather(-1, case.targets[..., None]).squeeze(-1)
    (picked * case.weights).sum().backward()
    return {
        "logprobs": picked.detach(),
        "topk_logprobs": logp.detach().gather(-1, case.topk),
        "entropy": -(logp.detach().exp() * logp.detach()).sum(-1),
        "grad": logits.grad,
    }


def shard_of(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = full.shape[-1] // world
    return full[..., rank * width : (rank + 1) * width]


# (value atol, gradient atol, gradient rtol) per logits dtype: fp64 is computed in fp64, fp32 and bf16 in fp32 (the
# bf16 rounding is in the inputs, which the reference sees too); the bf16 gradient is rounded to bf16 (2⁻⁹ relative).
TOLERANCE = {torch.float64: (1e-11, 1e-13, 0.0), torch.float32: (2e-5, 2e-6, 0.0), torch.bfloat16: (2e-5, 1e-6, 4e-3)}


def check_against_reference(
    case: Case,
    *,
    group: dist.ProcessGroup | None,
    rank: int,
    world: int,
    temperature: float,
    chunk_tokens: int,
    with_topk: bool = True,
    with_entropy: bool = True,
) -> None:
    """This rank's values equal the reference everywhere and its logits gradient equals the reference's slice."""
    ref = reference(case, temperature)
    shard = shard_of(case.logits, rank, world).clone().requires_grad_(True)
    out = vocab_parallel_logprobs(
        shard,
        case.targets,
        group=group,
        topk_ids=case.topk if with_topk else None,
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_tokens=chunk_tokens,
    )
    (out.logprobs.double() * case.weights).sum().backward()
    value_tol, grad_atol, grad_rtol = TOLERANCE[case.logits.dtype]
    compute = torch.float64 if case.logits.dtype == torch.float64 else torch.float32
    assert out.logprobs.dtype == compute and out.logprobs.shape == case.targets.shape
    torch.testing.assert_close(out.logprobs.double(), ref["logprobs"], atol=value_tol, rtol=0)
    if with_topk:
        assert out.topk_logprobs is not None and not out.topk_logprobs.requires_grad
        torch.testing.assert_close(out.topk_logprobs.double(), ref["topk_logprobs"], atol=value_tol, rtol=0)
    else:
        assert out.topk_logprobs is None
    if with_entropy:
        assert out.entropy is not None and not out.entropy.requires_grad
        torch.testing.assert_close(out.entropy.double(), ref["entropy"], atol=value_tol, rtol=0)
    else:
        assert out.entropy is None
    assert shard.grad is not None and shard.grad.dtype == case.logits.dtype
    torch.testing.assert_close(shard.grad.double(), shard_of(ref["grad"], rank, world), atol=grad_atol, rtol=grad_rtol)


# (dtype, temperature, chunk_tokens, with_topk, with_entropy): chunks of 1, 5 and 16 leave ragged ends over 39 tokens,
# 39 is exactly one chunk, 4096 (the default) is larger than the input.
CASES = [
    (torch.float64, 1.0, 5, True, True),
    (torch.float64, 0.7, 16, True, True),
    (torch.float64, 1.3, 1, False, True),
    (torch.float32, 0.7, 5, True, True),
    (torch.float32, 1.0, 39, True, False),
    (torch.bfloat16, 0.7, 4096, True, True),
    (torch.bfloat16, 1.0, 16, False, False),
]


def run_cases(group: dist.ProcessGroup | None, rank: int, world: int, seed: int = 0) -> None:
    for i, (dtype, temperature, chunk, with_topk, with_entropy) in enumerate(CASES):
        check_against_reference(
            make_case(seed + i, dtype),
            group=group,
            rank=rank,
            world=world,
            temperature=temperature,
            chunk_tokens=chunk,
            with_topk=with_topk,
            with_entropy=with_entropy,
        )


def gradcheck_sharded(group: dist.ProcessGroup | None, rank: int, world: int) -> None:
    """torch.autograd.gradcheck (float64) of log π(target) w.r.t. each rank's shard in turn.

    The active rank runs gradcheck on its shard; before each of gradcheck's forwards it broadcasts "one more", and
    the other ranks run the same forward on their fixed shards (so the collectives match), until it broadcasts
    "done". The finite differences therefore measure d log π / d (active shard) alone — including its coupling to
    the other shards through the distributed lse — against our analytic backward on that shard.
    """
    case = make_case(123, torch.float64, tokens=(4,), vocab=8 * world)
    local = shard_of(case.logits, rank, world).contiguous()

    def logprobs(x: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logprobs(
            x, case.targets, group=group, topk_ids=case.topk, temperature=0.8, chunk_tokens=3
        ).logprobs

    for active in range(world):
        src = 0 if group is None else dist.get_global_rank(group, active)
        flag = torch.empty(1)
        if rank == active:

            def announced(x: torch.Tensor, src: int = src) -> torch.Tensor:
                if world > 1:
                    dist.broadcast(torch.ones(1), src=src, group=group)
                return logprobs(x)

            assert torch.autograd.gradcheck(announced, (local.clone().requires_grad_(True),), atol=1e-8, rtol=1e-6)
            if world > 1:
                dist.broadcast(torch.zeros(1), src=src, group=group)
        else:
            while True:
                dist.broadcast(flag, src=src, group=group)
                if flag.item() == 0:
                    break
                logprobs(local)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_communication(group: dist.ProcessGroup, rank: int, world: int) -> None:
    """Per chunk exactly one [chunk] MAX and one [chunk, K + 3] SUM all-reduce — nothing of size V, no gathers."""
    calls: list[tuple[tuple[int, ...], dist.ReduceOp.RedOpType]] = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: object) -> None:
        calls.append((tuple(tensor.shape), op))
        all_reduce(tensor, op=op, group=group)

    dist.all_reduce = counting_all_reduce  # type: ignore[assignment]
    try:
        case = make_case(7, torch.float32)
        check_against_reference(case, group=group, rank=rank, world=world, temperature=1.0, chunk_tokens=16)
    finally:
        dist.all_reduce = all_reduce
    per_chunk = [[((c,), dist.ReduceOp.MAX), ((c, K + 3), dist.ReduceOp.SUM)] for c in (16, 16, 7)]  # 39 tokens
    assert calls == ([] if world == 1 else [call for chunk in per_chunk for call in chunk]), calls


def _tp_worker(rank: int, world: int) -> None:
    """One of 4 spawned ranks: TP = 4 over the world, then two TP = 2 groups, then four TP = 1 groups.

    The subgroups are laid out as beside data parallelism, so a rank's shard index is its rank *in the group*.
    """
    assert world == 4
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
        singles = [dist.new_group([r]) for r in range(world)]
        for group, tp, seed in [
            (dist.group.WORLD, 4, 0),
            (pairs[rank // 2], 2, 100 + 10 * (rank // 2)),
            (singles[rank], 1, 200 + 10 * rank),
        ]:
            rank_in_group = dist.get_rank(group)
            run_cases(group, rank_in_group, tp, seed=seed)
            check_communication(group, rank_in_group, tp)
            if tp == 2:
                gradcheck_sharded(group, rank_in_group, tp)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_1_2_4_match_float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 gloo processes on 127.0.0.1 (one spawn for all three TP sizes: process start-up dominates the cost)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_tp_worker, args=(4,), nprocs=4, join=True)


def test_single_process_matches_float64_reference() -> None:
    run_cases(None, 0, 1)


def test_single_process_gradcheck() -> None:
    gradcheck_sharded(None, 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "chunk_tokens"), [(1.0, 4096), (0.6, 7), (1.7, 1)])
def test_single_process_equals_gather_logprobs(dtype: torch.dtype, temperature: float, chunk_tokens: int) -> None:
    """group=None is the same computation as the single-process `nemo_dppo.logprobs.gather_logprobs`."""
    case = make_case(3, dtype)
    ours, theirs = case.logits.clone().requires_grad_(True), case.logits.clone().requires_grad_(True)
    kwargs = {"topk_ids": case.topk, "temperature": temperature, "with_entropy": True, "chunk_tokens": chunk_tokens}
    a = vocab_parallel_logprobs(ours, case.targets, **kwargs)
    b = gather_logprobs(theirs, case.targets, **kwargs)
    (a.logprobs * case.weights.float()).sum().backward()
    (b.logprobs * case.weights.float()).sum().backward()
    for name in ("logprobs", "topk_logprobs", "entropy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-2)


def test_grad_in_logits_reuses_the_logits_storage() -> None:
    """grad_in_logits=True: the same gradient, written into the logits' storage; misuse fails loudly."""
    case = make_case(5, torch.float64)
    kwargs = {"topk_ids": case.topk, "temperature": 0.9, "chunk_tokens": 5}
    weight = torch.randn(8, VOCAB, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(*TOKENS, 8, dtype=torch.float64)

    x = (hidden @ weight).detach().requires_grad_(True)
    (vocab_parallel_logprobs(x, case.targets, **kwargs).logprobs * case.weights).sum().backward()
    assert x.grad is not None
    expected_weight_grad = hidden.reshape(-1, 8).T @ x.grad.reshape(-1, VOCAB)

    logits = hidden @ weight  # a non-leaf, as out of an LM head
    out = vocab_parallel_logprobs(logits, case.targets, grad_in_logits=True, **kwargs)
    seen: list[torch.Tensor] = []
    logits.register_hook(seen.append)
    (out.logprobs * case.weights).sum().backward()
    assert seen[0].data_ptr() == logits.data_ptr()  # the gradient lives in the logits' storage
    torch.testing.assert_close(seen[0], x.grad, atol=0, rtol=0)
    torch.testing.assert_close(weight.grad, expected_weight_grad)

    # Another backward that needs the (now overwritten) logits fails loudly instead of using garbage.
    logits = hidden @ weight
    squares = (logits**2).sum()  # saves `logits`; created earlier, so its backward runs after ours
    out = vocab_parallel_logprobs(logits, case.targets, grad_in_logits=True, **kwargs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logprobs.sum() + squares).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_bounded_by_chunk_tokens(dtype: torch.dtype) -> None:
    """Forward: one [chunk, V] fp32 buffer (+ O(tokens·K)). Backward: the returned gradient (none with
    grad_in_logits), plus one [chunk, V] fp32 buffer for bf16 logits (fp32 logits are computed in the gradient).

    Measured with TensorMemoryMeter, which counts every storage allocated by a torch op; the naive full log_softmax
    is measured the same way as a control that the meter sees a [tokens, V] temporary when there is one.
    """
    tokens, vocab = 256, 2048
    case = make_case(11, dtype, tokens=(tokens,), vocab=vocab)
    row_bytes = vocab * 4  # one fp32 row
    small = tokens * (K + 4) * 24  # per-token stats, outputs, ids, per-chunk gathers: O(tokens · K), not O(vocab)
    forward_peaks = {}
    for chunk in (8, 32, 128):
        for grad_in_logits in (False, True):
            logits = case.logits.clone().requires_grad_(True)
            with TensorMemoryMeter() as forward:
                out = vocab_parallel_logprobs(
                    logits,
                    case.targets,
                    topk_ids=case.topk,
                    with_entropy=True,
                    chunk_tokens=chunk,
                    grad_in_logits=grad_in_logits,
                )
            with TensorMemoryMeter() as backward:
                out.logprobs.sum().backward()
            assert chunk * row_bytes <= forward.peak <= chunk * row_bytes + small, (chunk, forward.peak)
            gradient = 0 if grad_in_logits else logits.numel() * logits.element_size()
            buffer = 0 if dtype == torch.float32 else chunk * row_bytes
            assert gradient + buffer <= backward.peak <= gradient + buffer + small, (chunk, backward.peak)
            forward_peaks[chunk] = forward.peak
    assert math.isclose(forward_peaks[128] - forward_peaks[8], 120 * row_bytes, rel_tol=0.05)

    logits = case.logits.clone().requires_grad_(True)
    with TensorMemoryMeter() as meter:
        naive = torch.log_softmax(logits.float(), -1).gather(-1, case.targets[:, None])
        naive.sum().backward()
    assert meter.peak >= 3 * tokens * row_bytes  # log_softmax output + gather's zero-filled grad + input grad


def test_rejects_bad_arguments() -> None:
    case = make_case(0, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(case.logits, case.targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_logprobs(case.logits, case.targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="target_ids"):
        vocab_parallel_logprobs(case.logits, case.targets[:, :-1])
    with pytest.raises(ValueError, match="topk_ids"):
        vocab_parallel_logprobs(case.logits, case.targets, topk_ids=case.topk[:, :-1])
    with pytest.raises(TypeError, match="floating point"):
        vocab_parallel_logprobs(case.logits.long(), case.targets)


def test_empty_input() -> None:
    logits = torch.zeros(0, VOCAB, requires_grad=True)
    no_ids = torch.zeros(0, dtype=torch.long)
    out = vocab_parallel_logprobs(logits, no_ids, topk_ids=no_ids.reshape(0, 1).expand(0, K))
    assert out.logprobs.shape == (0,) and out.topk_logprobs is not None and out.topk_logprobs.shape == (0, K)
    out.logprobs.sum().backward()
    assert logits.grad is not None and logits.grad.shape == (0, VOCAB)
