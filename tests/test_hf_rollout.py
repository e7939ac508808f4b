"""HF rollout engine: log-probs and Top-K vs an independent teacher-forced forward, seeds, dtypes."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3MoeForCausalLM

from nemo_dppo.engines.base import RolloutEngine, RolloutSample, SamplingParams
from nemo_dppo.engines.hf_rollout import HFRolloutEngine, topk_with_sampled
from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, load_model_dir, save_model_dir
from nemo_dppo.tasks.arithmetic import ArithmeticTask

TOL = 1e-4


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    problems = ArithmeticTask(num_digits=2, ops=("+", "-"), seed=0).sample(6, "train")
    ids = [tokenizer(p.prompt).input_ids for p in problems]
    ids[1] = ids[1][2:]  # different prompt lengths exercise the left padding
    ids[2] = ids[2][:3]
    return ids


def teacher_forced_logprobs(model: Qwen3MoeForCausalLM, sample: RolloutSample, temperature: float) -> torch.Tensor:
    """Full-vocabulary log_softmax(logits / T) at each response position, `[T, V]` fp32, unpadded forward."""
    ids = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    p = sample.prompt_ids.numel()
    return torch.log_softmax(logits[p - 1 : -1] / temperature, dim=-1)


def all_samples(out: list[list[RolloutSample]]) -> list[RolloutSample]:
    return [s for group in out for s in group]


def test_engine_satisfies_protocol_and_shapes(model, tokenizer, prompts) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(n=3, max_new_tokens=8, logprobs_topk=5, seed=0)
    out = engine.generate(prompts, params)
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


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_fp32_logprobs_and_topk_match_teacher_forcing(model, tokenizer, prompts, temperature) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    k = 6
    params = SamplingParams(n=4, max_new_tokens=10, temperature=temperature, logprobs_topk=k, seed=3)
    for s in all_samples(engine.generate(prompts, params)):
        ref = teacher_forced_logprobs(model, s, temperature)
        assert torch.isfinite(ref).all()
        sampled_ref = ref.gather(-1, s.response_ids.unsqueeze(-1)).squeeze(-1)
        assert (s.logprobs - sampled_ref).abs().max() <= TOL
        assert (s.topk_logprobs - ref.gather(-1, s.topk_ids)).abs().max() <= TOL
        # The sampled id is always in the set; slots 0..K-2 are the K-1 most likely under the reference.
        assert (s.topk_ids == s.response_ids.unsqueeze(-1)).any(dim=-1).all()
        ref_top = ref.topk(k, dim=-1)
        assert (s.topk_logprobs[:, : k - 1] - ref_top.values[:, : k - 1]).abs().max() <= TOL
        outside = ~(ref_top.indices == s.response_ids.unsqueeze(-1)).any(dim=-1)
        assert torch.equal(s.topk_ids[outside, -1], s.response_ids[outside])


def test_sampled_token_swapped_into_last_slot(model, tokenizer, prompts) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    params = SamplingParams(n=8, max_new_tokens=12, temperature=3.0, logprobs_topk=1, seed=11)
    outside = 0
    for s in all_samples(engine.generate(prompts, params)):
        ref = teacher_forced_logprobs(model, s, 3.0)
        assert torch.equal(s.topk_ids[:, 0], s.response_ids)  # K=1: the only slot holds the sampled token
        assert torch.allclose(s.topk_logprobs[:, 0], s.logprobs)
        outside += int((ref.argmax(dim=-1) != s.response_ids).sum())
    assert outside > 0  # the construction really produced non-argmax samples


def test_topk_with_sampled_helper() -> None:
    lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]]), dim=-1)
    ids, vals = topk_with_sampled(lp, torch.tensor([1, 3]), k=2)
    assert ids.tolist() == [[0, 1], [0, 3]]
    assert torch.allclose(vals[1], lp[1, [0, 3]])


def test_top_p_logprobs_are_the_renormalised_nucleus(model, tokenizer, prompts) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    top_p, temperature = 0.6, 1.3
    params = SamplingParams(n=3, max_new_tokens=8, temperature=temperature, top_p=top_p, logprobs_topk=4, seed=5)
    for s in all_samples(engine.generate(prompts, params)):
        ref = teacher_forced_logprobs(model, s, temperature)
        probs_sorted, order = ref.exp().sort(dim=-1, descending=True)
        keep_sorted = (probs_sorted.cumsum(dim=-1) - probs_sorted) < top_p  # smallest prefix reaching top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        nucleus = torch.log_softmax(ref.masked_fill(~keep, float("-inf")), dim=-1)
        expected = nucleus.gather(-1, s.response_ids.unsqueeze(-1)).squeeze(-1)
        assert torch.isfinite(s.logprobs).all()
        assert (s.logprobs - expected).abs().max() <= TOL
        top = s.topk_logprobs
        assert torch.equal(torch.isinf(top), torch.isinf(nucleus.gather(-1, s.topk_ids)))


def test_checkpoint_generation_defaults_do_not_leak(model, tokenizer, prompts) -> None:
    noisy = build_tiny_qwen3_moe(TinyMoEConfig(seed=1, initializer_range=0.2), tokenizer)
    noisy.generation_config.top_k = 3
    noisy.generation_config.repetition_penalty = 3.0
    noisy.generation_config.min_p = 0.2
    engine = HFRolloutEngine(noisy, tokenizer, dtype="fp32")
    assert noisy.generation_config.top_k == 3  # the caller's model is left alone
    params = SamplingParams(n=4, max_new_tokens=8, temperature=2.0, seed=1)
    for s in all_samples(engine.generate(prompts, params)):
        ref = teacher_forced_logprobs(model, s, 2.0).gather(-1, s.response_ids[:, None])[:, 0]
        assert (s.logprobs - ref).abs().max() <= TOL


def test_same_seed_same_tokens(model, tokenizer, prompts) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="bf16")
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


def test_greedy_is_argmax_and_seed_independent(model, tokenizer, prompts) -> None:
    engine = HFRolloutEngine(model, tokenizer, dtype="fp32")
    a = all_samples(engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8, seed=0, logprobs_topk=1)))
    b = all_samples(engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8, seed=9)))
    for sa, sb in zip(a, b, strict=True):
        assert torch.equal(sa.response_ids, sb.response_ids)
        ref = teacher_forced_logprobs(model, sa, 1.0)
        assert torch.equal(ref.argmax(dim=-1), sa.response_ids)
        assert (sa.logprobs - ref.max(dim=-1).values).abs().max() <= TOL


def test_bf16_rollout_differs_fp32_matches(model, tokenizer, prompts) -> None:
    params = SamplingParams(n=4, max_new_tokens=10, seed=2)
    diffs = {}
    for dtype in ("fp32", "bf16"):
        engine = HFRolloutEngine(model, tokenizer, dtype=dtype)
        assert next(engine.model.parameters()).dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
        diffs[dtype] = max(
            (s.logprobs - teacher_forced_logprobs(model, s, 1.0).gather(-1, s.response_ids[:, None])[:, 0])
            .abs()
            .max()
            .item()
            for s in all_samples(engine.generate(prompts, params))
        )
    assert diffs["fp32"] <= TOL
    assert diffs["bf16"] > 0.0


def test_engine_owns_a_copy_and_sync_weights(model, tokenizer, prompts, tmp_path) -> None:
    trainer = build_tiny_qwen3_moe(TinyMoEConfig(seed=1, initializer_range=0.2), tokenizer)
    engine = HFRolloutEngine(trainer, tokenizer, dtype="bf16")
    with torch.no_grad():
        trainer.lm_head.weight.add_(1.0)  # a trainer update must not leak into the engine...
    assert not torch.equal(engine.model.lm_head.weight, trainer.lm_head.weight.bfloat16())
    engine.sync_weights(trainer.state_dict())  # ...until synced, cast to the engine dtype
    for name, p in engine.model.state_dict().items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, trainer.state_dict()[name].bfloat16()), name
    # Per-expert checkpoint names (as written by save_pretrained) are accepted too.
    path = os.path.join(tmp_path, "ckpt")
    save_model_dir(model, tokenizer, path)
    ckpt = load_file(os.path.join(path, "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in ckpt)
    fp32_engine = HFRolloutEngine(trainer, tokenizer, dtype="fp32")
    fp32_engine.sync_weights(ckpt)
    for name, p in fp32_engine.model.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    with pytest.raises(KeyError):
        fp32_engine.sync_weights({"lm_head.weight": model.lm_head.weight})
    # An engine built from the directory gives the same tokens and log-probs as one built from the object.
    params = SamplingParams(n=2, max_new_tokens=6, seed=4)
    from_dir = all_samples(HFRolloutEngine(path, dtype="fp32").generate(prompts, params))
    from_obj = all_samples(fp32_engine.generate(prompts, params))
    for a, b in zip(from_dir, from_obj, strict=True):
        assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs)


def test_load_model_dir_errors(model, tokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model_dir(os.path.join(tmp_path, "missing"))
    path = os.path.join(tmp_path, "m")
    save_model_dir(model, tokenizer, path)
    loaded, tok = load_model_dir(path, "bf16")
    assert loaded.dtype == torch.bfloat16 and len(tok) == len(tokenizer)
    small = build_tiny_qwen3_moe(TinyMoEConfig(), tokenizer)
    small.resize_token_embeddings(len(tokenizer) - 4)
    bad = os.path.join(tmp_path, "small")
    save_model_dir(small, tokenizer, bad)
    with pytest.raises(ValueError, match="vocab"):
        load_model_dir(bad)
    with open(os.path.join(bad, "config.json"), "w", encoding="utf-8") as f:
        f.write('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="Qwen3-MoE"):
        load_model_dir(bad)
