"""Rollout engine on HF `generate` (CPU, tests): behaviour policy μ, processed log-probs, Top-K, R3 routes.

The engine owns its own copy of the model in its own dtype (bf16 by default), so the training–inference
mismatch between the fp32 trainer and the rollout is real. Log-probs are those of the distribution actually
sampled from (after temperature and top-p, spec `logprobs_mode=processed_logprobs`), computed in fp32 from the
logits: tokens removed by top-p have log-prob -inf. Greedy decoding (`params.greedy`) reports the raw
(temperature 1, no top-p) log-probs, since argmax has no sampling distribution.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.utils import GenerateDecoderOnlyOutput

from nemo_dppo.engines.base import RolloutSample, SamplingParams
from nemo_dppo.models.tiny_moe import load_model_dir, resolve_dtype
from nemo_dppo.moe.router_replay import RouterRecorder

_EXPERT_KEY = ".mlp.experts."


def topk_with_sampled(logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K ids / log-probs of `logprobs` `[..., V]`; `sampled` `[...]` takes slot K-1 when outside them."""
    values, ids = torch.topk(logprobs, k, dim=-1)
    missing = ~(ids == sampled.unsqueeze(-1)).any(dim=-1)
    ids[..., -1] = torch.where(missing, sampled, ids[..., -1])
    values[..., -1] = torch.where(missing, logprobs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1), values[..., -1])
    return ids, values


class HFRolloutEngine:
    """`RolloutEngine` on HF `model.generate` (batched, KV cache, left padding)."""

    def __init__(
        self,
        model_dir_or_model: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str | torch.dtype = "bf16",
    ) -> None:
        self.dtype = resolve_dtype(dtype)
        if isinstance(model_dir_or_model, str):
            model, dir_tokenizer = load_model_dir(model_dir_or_model, self.dtype)
            tokenizer = tokenizer if tokenizer is not None else dir_tokenizer
        else:
            # A private copy: the trainer's later in-place updates must reach us only through sync_weights.
            model = copy.deepcopy(model_dir_or_model).to(self.dtype)
        if tokenizer is None:
            raise ValueError("a tokenizer is required when a model object is given")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.device = next(self.model.parameters()).device
        # A checkpoint's generation_config.json (e.g. top_k=20, repetition_penalty) would otherwise fill every
        # option we leave unset and silently change μ: keep only the special ids.
        self.model.generation_config = GenerationConfig(
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, bos_token_id=tokenizer.bos_token_id
        )

    @classmethod
    def from_config(cls, cfg: Any, model_dir: Path, tokenizer: PreTrainedTokenizerBase, topk: int) -> HFRolloutEngine:
        """The policy of `model_dir` in `rollout.dtype` (its own copy: the mismatch with the trainer is real).

        Loaded in fp32 and then cast, as the trainer's weights are cast at every sync: loading straight into
        bf16 keeps some buffers (rotary frequencies) at another precision and shifts μ slightly.
        """
        model, _ = load_model_dir(str(model_dir), "fp32")
        return cls(model, tokenizer, dtype=cfg.rollout.dtype)

    def close(self) -> None:
        """Nothing to free beyond the model itself."""

    # ------------------------------------------------------------------ weights
    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy the trainer's weights into the engine's model (cast to the engine dtype).

        Accepts the model's own parameter names (fused experts `mlp.experts.gate_up_proj` / `down_proj`)
        and the per-expert names of HF checkpoints (`mlp.experts.{e}.{gate,up,down}_proj.weight`).
        """
        own = self.model.state_dict()
        fused = _fuse_expert_weights(state_dict, own)
        missing = [name for name in own if name not in fused]
        unknown = [name for name in fused if name not in own]
        if missing or unknown:
            raise KeyError(f"sync_weights: missing {missing[:5]} unexpected {unknown[:5]}")
        with torch.no_grad():
            for name, target in own.items():
                source = fused[name]
                if tuple(source.shape) != tuple(target.shape):
                    got, want = tuple(source.shape), tuple(target.shape)
                    raise ValueError(f"sync_weights: {name} has shape {got}, expected {want}")
                target.copy_(source.detach().to(device=target.device))

    # --------------------------------------------------------------- generation
    def _generation_config(self, params: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        common = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
            "return_dict_in_generate": True,
            "use_cache": True,
        }
        if params.greedy:
            return GenerationConfig(do_sample=False, output_logits=True, **common)
        if params.temperature <= 0.0:
            raise ValueError("temperature must be > 0 when sampling (use greedy=True for argmax)")
        # top_k=0 disables HF's default top-50 filter: μ must be softmax(logits / T) restricted by top-p only.
        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            output_scores=True,
            **common,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[RolloutSample]]:
        """For each prompt, `params.n` samples. The same seed and inputs give the same tokens."""
        if not prompts:
            return []
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be >= 1")
        rows = [list(map(int, p)) for p in prompts for _ in range(params.n)]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        input_ids, attention_mask = self._left_padded(rows)
        p_max = input_ids.shape[1]
        config = self._generation_config(params, params.max_new_tokens)

        rng_devices = [self.device] if self.device.type != "cpu" else []
        with torch.random.fork_rng(devices=rng_devices, device_type=self.device.type):
            torch.manual_seed(params.seed)
            if params.record_routes:
                with RouterRecorder(self.model) as recorder:
                    out = self._run(input_ids, attention_mask, config)
                routes: torch.Tensor | None = recorder.routes()
            else:
                out = self._run(input_ids, attention_mask, config)
                routes = None

        generated = out.sequences[:, p_max:].cpu()
        steps = out.logits if params.greedy else out.scores
        num_steps = generated.shape[1]
        logprobs_all = torch.log_softmax(torch.stack(list(steps[:num_steps]), dim=1).float().cpu(), dim=-1)
        sampled_lp = logprobs_all.gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # [B, G]
        k = params.logprobs_topk
        topk_ids = topk_lp = None
        if k > 0:
            topk_ids, topk_lp = topk_with_sampled(logprobs_all, generated, min(k, logprobs_all.shape[-1]))
        if routes is not None:
            routes = routes[:, : p_max + num_steps - 1].cpu()

        has_eos, lengths_t = self._response_lengths(generated)

        samples: list[RolloutSample] = []
        for i, row in enumerate(rows):
            t = int(lengths_t[i])
            sample = RolloutSample(
                prompt_ids=torch.tensor(row, dtype=torch.int64),
                response_ids=generated[i, :t].clone(),
                logprobs=sampled_lp[i, :t].clone(),
                finished=bool(has_eos[i]),
            )
            if topk_ids is not None and topk_lp is not None:
                sample.topk_ids = topk_ids[i, :t].clone()
                sample.topk_logprobs = topk_lp[i, :t].clone()
            if routes is not None:
                start = p_max - len(row)
                sample.routed_experts = routes[i, start : p_max + t - 1].clone()
            samples.append(sample)
        return [samples[j * params.n : (j + 1) * params.n] for j in range(len(prompts))]

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left-padded to one width: input ids and attention mask [B, P_max]."""
        p_max = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), p_max), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), p_max), dtype=torch.int64)
        for i, r in enumerate(rows):
            input_ids[i, p_max - len(r) :] = torch.tensor(r, dtype=torch.int64)
            attention_mask[i, p_max - len(r) :] = 1
        return input_ids, attention_mask

    def _response_lengths(self, generated: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Whether each row produced EOS, and its response length (EOS included; the whole row without one)."""
        is_eos = generated == self.eos_id
        has_eos = is_eos.any(dim=1)
        num_steps = generated.shape[1]
        first_eos = torch.where(
            has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, num_steps, dtype=torch.int64)
        )
        return has_eos, torch.where(has_eos, first_eos + 1, first_eos).tolist()

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig
    ) -> GenerateDecoderOnlyOutput:
        return self.model.generate(  # type: ignore[return-value]
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
        )


def _fuse_expert_weights(
    state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map per-expert checkpoint names onto the fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if _EXPERT_KEY in name and name.endswith(".weight") and name not in own:
            prefix, rest = name.split(_EXPERT_KEY, 1)
            expert, proj = rest[: -len(".weight")].split(".", 1)
            per_expert.setdefault(prefix, {})[(int(expert), proj)] = tensor
        else:
            out[name] = tensor
    for prefix, parts in per_expert.items():
        num_experts = 1 + max(e for e, _ in parts)
        try:
            gate_up = [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], dim=0) for e in range(num_experts)]
            down = [parts[(e, "down_proj")] for e in range(num_experts)]
        except KeyError as err:
            raise KeyError(f"sync_weights: incomplete per-expert weights under {prefix}: {err}") from None
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(down)
    return out
