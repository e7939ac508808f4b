"""R3 on HF Qwen3-MoE: routes recorded in generation, replayed in a teacher-forced forward (router grads)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from nemo_dppo.engines.base import RolloutSample, SamplingParams
from nemo_dppo.engines.hf_rollout import HFRolloutEngine
from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe
from nemo_dppo.models.tokenizer import build_tokenizer
from nemo_dppo.moe.router_replay import (
    RouterRecorder,
    RouterReplay,
    collate_routes,
    moe_blocks,
    routes_shape,
    routing_disagreement,
)
from nemo_dppo.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> Qwen3MoeForCausalLM:
    return build_tiny_qwen3_moe(TinyMoEConfig(seed=2, initializer_range=0.1), tokenizer)


@pytest.fixture(scope="module")
def rollout(model, tokenizer) -> list[RolloutSample]:
    """fp32 rollouts with routes, from prompts of different lengths (left padding in generate)."""
    problems = ArithmeticTask(num_digits=2, ops=("+", "*"), seed=1).sample(4, "train")
    prompts = [tokenizer(p.prompt).input_ids for p in problems]
    prompts[0], prompts[1] = prompts[0][3:], prompts[1][1:]
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    params = SamplingParams(n=3, max_new_tokens=10, temperature=1.5, record_routes=True, seed=0)
    return [s for group in engine.generate(prompts, params) for s in group]


def teacher_batch(samples: list[RolloutSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids `[B, S]` and attention mask."""
    seqs = [torch.cat([s.prompt_ids, s.response_ids]) for s in samples]
    seq_len = max(x.numel() for x in seqs)
    ids = torch.full((len(seqs), seq_len), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, : x.numel()] = x
        mask[i, : x.numel()] = 1
    return ids, mask


def perturbed(model: Qwen3MoeForCausalLM, scale: float = 0.2) -> Qwen3MoeForCausalLM:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in moe_blocks(other):
            block.gate.weight.add_(scale * torch.randn(block.gate.weight.shape, generator=gen))
    return other


class ExpertInputs:
    """Captures the expert indices and gate weights that actually reach the experts of every MoE layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.indices: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.handles = [b.experts.register_forward_pre_hook(self._hook) for b in moe_blocks(model)]

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.indices.append(args[1].detach())
        self.weights.append(args[2].detach())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_recorded_routes_shape_and_validity(model, rollout) -> None:
    num_layers, k, num_experts = routes_shape(model)
    assert (num_layers, k, num_experts) == (2, 2, 8)
    for s in rollout:
        r = s.routed_experts
        assert r is not None and r.dtype == torch.int64
        assert r.shape == (s.prompt_ids.numel() + s.response_ids.numel() - 1, num_layers, k)
        assert int(r.min()) >= 0 and int(r.max()) < num_experts
        assert (r[..., 0] != r[..., 1]).all()  # top-k without duplicates


def test_fp32_rollout_routes_equal_teacher_forced_own_routes(model, tokenizer, rollout) -> None:
    ids, mask = teacher_batch(rollout, tokenizer.pad_token_id)
    with torch.no_grad(), RouterRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    own = rec.routes()
    assert own.shape == (*ids.shape, 2, 2) and rec.num_calls == 1
    recorded, valid = collate_routes([s.routed_experts for s in rollout], ids.shape[1])
    assert routing_disagreement(own, recorded, valid) == 0.0
    assert torch.equal(own[valid], recorded[valid])  # same order too (the router's top-k order)
    # Per sample, unpadded: the same routes row for row.
    for s in rollout[:3]:
        x = torch.cat([s.prompt_ids, s.response_ids]).unsqueeze(0)
        with torch.no_grad(), RouterRecorder(model) as rec:
            model(input_ids=x)
        assert torch.equal(rec.routes()[0, :-1], s.routed_experts)


def test_replay_forces_recorded_experts_and_router_gets_gradients(model, tokenizer, rollout) -> None:
    trained = perturbed(model)
    ids, mask = teacher_batch(rollout, tokenizer.pad_token_id)
    routes, valid = collate_routes([s.routed_experts for s in rollout], ids.shape[1])

    # Replay off: the perturbed router's own choice disagrees with the rollout's.
    with torch.no_grad(), RouterRecorder(trained) as rec:
        model_out_free = trained(input_ids=ids, attention_mask=mask).logits
    free_routes = rec.routes()
    assert routing_disagreement(free_routes, routes, valid) > 0.0

    trained.zero_grad(set_to_none=True)
    spy = ExpertInputs(trained)
    try:
        with RouterReplay(trained, routes) as replay:
            logits = trained(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            (-(logp * mask[:, 1:]).sum()).backward()
            disagreement = replay.disagreement(valid)
            own = replay.own_routes()
    finally:
        spy.remove()

    # The experts the training forward used are exactly the recorded ones (100%), at every layer.
    used = torch.stack([i.reshape(*ids.shape, -1) for i in spy.indices], dim=2)
    assert torch.equal(used[valid], routes[valid])
    assert torch.equal(used, routes)  # padding rows were forced to the arange(k) filler
    # The router still chose otherwise on its own, and that is reported.
    assert disagreement == pytest.approx(routing_disagreement(own, routes, valid)) and disagreement > 0.0
    assert torch.equal(own[:, :, 0], free_routes[:, :, 0])  # layer 0 sees the same inputs with or without replay
    assert not torch.allclose(logits, model_out_free)
    # Router weights get non-zero gradients under replay.
    for block in moe_blocks(trained):
        grad = block.gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_replay_gate_weights_are_renormalised_softmax_of_training_logits(model, tokenizer, rollout) -> None:
    trained = perturbed(model)
    ids, mask = teacher_batch(rollout[:4], tokenizer.pad_token_id)
    routes, _ = collate_routes([s.routed_experts for s in rollout[:4]], ids.shape[1])
    gate_logits: list[torch.Tensor] = []
    handles = [
        b.gate.register_forward_hook(lambda _m, _a, out: gate_logits.append(out[0].detach()))
        for b in moe_blocks(trained)
    ]
    spy = ExpertInputs(trained)
    try:
        with torch.no_grad(), RouterReplay(trained, routes):
            trained(input_ids=ids, attention_mask=mask)
    finally:
        spy.remove()
        for h in handles:
            h.remove()
    for layer, logits in enumerate(gate_logits):
        forced = routes[:, :, layer].reshape(-1, 2)
        expected = torch.softmax(logits.float(), dim=-1).gather(-1, forced)
        expected = expected / expected.sum(dim=-1, keepdim=True)
        assert torch.allclose(spy.weights[layer], expected, atol=1e-6)


def test_replay_of_own_routes_is_transparent(model, tokenizer, rollout) -> None:
    ids, mask = teacher_batch(rollout, tokenizer.pad_token_id)
    with torch.no_grad(), RouterRecorder(model) as rec:
        free = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), RouterReplay(model, rec.routes()) as replay:
        forced = model(input_ids=ids, attention_mask=mask).logits
        assert replay.disagreement() == 0.0
    assert torch.equal(free, forced)
    # Hooks are gone after the context: a plain forward is unaffected.
    assert not any(b.gate._forward_hooks for b in moe_blocks(model))


def test_replay_input_checks(model) -> None:
    ids = torch.tensor([[1, 5, 6, 14]])
    with pytest.raises(ValueError, match=r"\[B, S, 2, 2\]"):
        RouterReplay(model, torch.zeros(1, 4, 3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        RouterReplay(model, torch.full((1, 4, 2, 2), 8, dtype=torch.int64))
    with (
        pytest.raises(ValueError, match="forward got"),
        torch.no_grad(),
        RouterReplay(model, torch.zeros(1, 3, 2, 2, dtype=torch.int64)),
    ):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="do not fit"):
        collate_routes([torch.zeros(5, 2, 2, dtype=torch.int64)], seq_len=4)
    routes, valid = collate_routes([torch.full((2, 2, 2), 7, dtype=torch.int64)], seq_len=4, offsets=[1])
    assert valid.tolist() == [[False, True, True, False]]
    assert routes[0, 0].tolist() == [[0, 1], [0, 1]] and routes[0, 1].tolist() == [[7, 7], [7, 7]]
