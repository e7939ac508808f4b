"""Check a NeMo-RL recipe before it reaches a cluster: keys, loss settings, parallel layout, batches, lengths.

`validate_recipe(config)` takes the resolved config (plain dicts) and raises `RecipeError` with one line naming the
key and what is wrong, or returns a `RecipeSummary`. Checks:

- every key is known (`nemo_dppo.nemo_rl.recipes.schema`), else the valid keys and the closest match;
- `loss_fn` maps onto the loss core (`nemo_dppo.nemo_rl.loss_settings`): valid mode and values, nothing DPPO
  cannot honour;
- the model is in `nemo_dppo.nemo_rl.recipes.architectures` (local paths skip the architecture checks);
- world size = `cluster.num_nodes × cluster.gpus_per_node` (minus dedicated generation GPUs when not colocated);
- Megatron: TP divides the attention heads and KV heads, EP divides the experts (EP = 1 for dense models),
  world % (TP·PP·CP) = 0 and world % (EP·ETP·PP) = 0, MoE with TP > 1 needs sequence parallelism, the padded
  sequence length is divisible as sequence / context parallelism require;
- vLLM: TP divides the heads, divides or is a multiple of the KV heads, TP·PP divides the generation GPUs, EP is a
  multiple of TP and divides the experts;
- batches: prompts × generations is a multiple of `train_global_batch_size` (→ mini-batches per step), which is a
  multiple of DP × `train_micro_batch_size`;
- lengths: prompt + response tokens fit `max_total_sequence_length` and vLLM's `max_model_len`;
- R3 (`policy.router_replay.enabled`) needs an MoE model, Megatron and vLLM; Top-K modes need the synchronous
  vLLM worker, top-p 1 / top-k off, CP 1, no fused sequence-packing loss, K ≤ vLLM's `max_logprobs`;
- precision agrees with the Megatron optimiser's bf16 / fp16 flags; the synchronous `grpo_train` is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dppo.nemo_rl.key_errors import unknown_key_message
from nemo_dppo.nemo_rl.loss_settings import DPPOLossSettings, LossSettingsError, loss_settings
from nemo_dppo.nemo_rl.recipes.architectures import ARCHITECTURES, Architecture
from nemo_dppo.nemo_rl.recipes.recipe_loading import load_recipe, to_plain
from nemo_dppo.nemo_rl.recipes.schema import unknown_keys

#: vLLM's default engine argument `max_logprobs` (log-probs per token it will return).
VLLM_DEFAULT_MAX_LOGPROBS = 20
PRECISIONS = ("bfloat16", "float16", "float32")


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message is one line."""


@dataclass(frozen=True)
class RecipeSummary:
    """The layout a valid recipe describes."""

    model: str
    mode: str
    world_size: int
    data_parallel: int
    mini_batches: int
    global_batch: int
    router_replay: bool
    topk: int

    def line(self) -> str:
        r3 = "R3 on" if self.router_replay else "R3 off"
        topk = f", Top-K {self.topk}" if self.topk else ""
        return (
            f"{self.model}, loss {self.mode}{topk}: {self.world_size} GPUs, DP {self.data_parallel}, "
            f"{self.mini_batches} mini-batches of {self.global_batch} samples per step, {r3}"
        )


def validate_file(path: str | Path, overrides: Sequence[str] = ()) -> RecipeSummary:
    """Load `path` (with `defaults:` and overrides, like NeMo-RL) and validate it."""
    return validate_recipe(to_plain(load_recipe(path, overrides)))


def validate_recipe(config: Mapping[str, Any]) -> RecipeSummary:
    """Validate a resolved recipe (plain containers); see the module docstring for the checks."""
    found = unknown_keys(dict(config))
    if found is not None:
        raise RecipeError(unknown_key_message(*found))
    view = _View(config)
    settings = _loss(view)
    arch = _architecture(view)
    train_gpus, generation_gpus, world = _gpus(view)
    dp = _megatron(view, arch, train_gpus)
    _vllm(view, arch, generation_gpus)
    mini_batches, global_batch = _batches(view, dp)
    _lengths(view)
    router_replay = _router_replay(view, arch)
    _topk(view, settings)
    _precision(view)
    _trainer(view)
    return RecipeSummary(
        model=str(view.get("policy.model_name")),
        mode=settings.core.mode,
        world_size=world,
        data_parallel=dp,
        mini_batches=mini_batches,
        global_batch=global_batch,
        router_replay=router_replay,
        topk=settings.topk,
    )


class _View:
    """Dotted-path access to the config with one-line errors for missing or non-integer values."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def get(self, path: str, default: Any = ...) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is ...:
                    raise RecipeError(f"missing key '{path}'")
                return default
            node = node[part]
        return node

    def positive(self, path: str, default: Any = ...) -> int:
        value = self.get(path, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"{path}={value!r} must be a positive integer")
        return value


def _loss(view: _View) -> DPPOLossSettings:
    try:
        return loss_settings(view.get("loss_fn"), max_new_tokens=view.get("policy.generation.max_new_tokens", None))
    except LossSettingsError as error:
        raise RecipeError(str(error)) from None


def _architecture(view: _View) -> Architecture | None:
    model = str(view.get("policy.model_name"))
    if model.startswith(("/", ".", "~")):
        return None  # a local checkpoint: no architecture checks
    if model not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise RecipeError(
            f"policy.model_name={model!r} is not in nemo_dppo.nemo_rl.recipes.architectures (known: {known}); add its "
            "head / KV-head / expert counts there"
        )
    return ARCHITECTURES[model]


def _gpus(view: _View) -> tuple[int, int, int]:
    """(training GPUs, generation GPUs, world size)."""
    per_node = view.positive("cluster.gpus_per_node")
    nodes = view.positive("cluster.num_nodes")
    world = per_node * nodes
    if view.get("policy.generation.colocated.enabled", True):
        return world, world, world
    resources = "policy.generation.colocated.resources"
    if nodes == 1:
        generation = view.positive(f"{resources}.gpus_per_node")
    else:
        generation = view.positive(f"{resources}.num_nodes") * per_node
    if generation >= world:
        raise RecipeError(f"{resources} takes {generation} of the {world} GPUs; none are left for training")
    return world - generation, generation, world


def _megatron(view: _View, arch: Architecture | None, train_gpus: int) -> int:
    """Check the Megatron layout; return the data-parallel size."""
    m = "policy.megatron_cfg"
    if not view.get(f"{m}.enabled", False):
        raise RecipeError(f"{m}.enabled must be true: the DPPO recipes train with NeMo-RL's Megatron backend")
    tp, pp, cp = (view.positive(f"{m}.{k}_parallel_size") for k in ("tensor_model", "pipeline_model", "context"))
    ep = view.positive(f"{m}.expert_model_parallel_size", 1)
    etp = view.positive(f"{m}.expert_tensor_parallel_size", 1)
    if arch is not None:
        if arch.attention_heads % tp or arch.kv_heads % tp:
            raise RecipeError(
                f"{m}.tensor_model_parallel_size={tp} must divide the model's {arch.attention_heads} attention heads "
                f"and {arch.kv_heads} KV heads"
            )
        _experts(f"{m}.expert_model_parallel_size", ep, arch)
    if train_gpus % (tp * pp * cp):
        raise RecipeError(
            f"training world size {train_gpus} is not a multiple of TP·PP·CP = {tp}·{pp}·{cp} ({m}.*_parallel_size)"
        )
    if train_gpus % (ep * etp * pp):
        raise RecipeError(
            f"training world size {train_gpus} is not a multiple of EP·ETP·PP = {ep}·{etp}·{pp} "
            f"({m}.expert_model_parallel_size, expert_tensor_parallel_size, pipeline_model_parallel_size)"
        )
    sequence_parallel = bool(view.get(f"{m}.sequence_parallel", False))
    if arch is not None and arch.is_moe and tp > 1 and not sequence_parallel:
        raise RecipeError(f"{m}.sequence_parallel must be true: Megatron requires it for MoE models with TP={tp} > 1")
    _padded_length(view, tp if sequence_parallel else 1, cp)
    if tp >= 4 and view.get("policy.train_micro_batch_size") != view.get("policy.logprob_batch_size", None):
        raise RecipeError(
            f"{m}.tensor_model_parallel_size={tp} ≥ 4 needs policy.logprob_batch_size == train_micro_batch_size "
            "(NeMo-RL asserts it: batch-variant TP numerics would otherwise skew π_old against π)"
        )
    return train_gpus // (tp * pp * cp)


def _padded_length(view: _View, sequence_parallel_tp: int, cp: int) -> None:
    """Sequence parallelism splits the sequence over TP ranks, context parallelism into 2·CP chunks."""
    factors = {}
    if sequence_parallel_tp > 1:
        factors["TP for sequence parallelism"] = sequence_parallel_tp
    if cp > 1:
        factors["2·CP for context parallelism"] = 2 * cp
    divisible_by = view.positive("policy.make_sequence_length_divisible_by", 1)
    if divisible_by % math.prod(factors.values()):
        why = " × ".join(f"{name} = {f}" for name, f in factors.items())
        raise RecipeError(f"policy.make_sequence_length_divisible_by={divisible_by} must be a multiple of {why}")


def _experts(path: str, ep: int, arch: Architecture) -> None:
    if arch.num_experts is None:
        if ep != 1:
            raise RecipeError(f"{path}={ep} must be 1: the model is dense (no experts)")
    elif arch.num_experts % ep:
        raise RecipeError(f"{path}={ep} must divide the model's {arch.num_experts} experts")


def _vllm(view: _View, arch: Architecture | None, generation_gpus: int) -> None:
    g = "policy.generation"
    backend = view.get(f"{g}.backend")
    if backend != "vllm":
        raise RecipeError(f"{g}.backend={backend!r} must be 'vllm' (μ, Top-K and R3 come from the vLLM rollout)")
    v = f"{g}.vllm_cfg"
    tp = view.positive(f"{v}.tensor_parallel_size")
    pp = view.positive(f"{v}.pipeline_parallel_size", 1)
    ep = view.positive(f"{v}.expert_parallel_size", 1)
    if arch is not None:
        if arch.attention_heads % tp or (arch.kv_heads % tp and tp % arch.kv_heads):
            raise RecipeError(
                f"{v}.tensor_parallel_size={tp} must divide the model's {arch.attention_heads} attention heads and "
                f"divide (or be a multiple of) its {arch.kv_heads} KV heads"
            )
        _experts(f"{v}.expert_parallel_size", ep, arch)
    if ep > 1 and ep % tp:
        raise RecipeError(f"{v}.expert_parallel_size={ep} must be a multiple of tensor_parallel_size={tp} (vLLM)")
    if generation_gpus % (tp * pp):
        raise RecipeError(f"generation GPUs {generation_gpus} are not a multiple of vLLM TP·PP = {tp}·{pp} ({v})")


def _batches(view: _View, dp: int) -> tuple[int, int]:
    """(mini-batches per step, global batch)."""
    samples = view.positive("grpo.num_prompts_per_step") * view.positive("grpo.num_generations_per_prompt")
    global_batch = view.positive("policy.train_global_batch_size")
    micro = view.positive("policy.train_micro_batch_size")
    view.positive("policy.logprob_batch_size")
    if samples % global_batch:
        raise RecipeError(
            f"grpo.num_prompts_per_step × num_generations_per_prompt = {samples} samples per step is not a multiple of "
            f"policy.train_global_batch_size={global_batch} (each mini-batch is one optimiser step)"
        )
    if global_batch % (dp * micro):
        raise RecipeError(
            f"policy.train_global_batch_size={global_batch} is not a multiple of DP × train_micro_batch_size = "
            f"{dp} × {micro}"
        )
    return samples // global_batch, global_batch


def _lengths(view: _View) -> None:
    prompt = view.positive("data.max_input_seq_length")
    response = view.positive("policy.generation.max_new_tokens")
    total = view.positive("policy.max_total_sequence_length")
    if prompt + response > total:
        raise RecipeError(
            f"data.max_input_seq_length={prompt} + policy.generation.max_new_tokens={response} exceeds "
            f"policy.max_total_sequence_length={total}"
        )
    model_len = view.positive("policy.generation.vllm_cfg.max_model_len")
    if model_len < prompt + response:
        raise RecipeError(
            f"policy.generation.vllm_cfg.max_model_len={model_len} is shorter than prompt + response = "
            f"{prompt} + {response}: vLLM would cut responses short"
        )


def _router_replay(view: _View, arch: Architecture | None) -> bool:
    if not view.get("policy.router_replay.enabled", False):
        return False
    if arch is not None and not arch.is_moe:
        raise RecipeError("policy.router_replay.enabled=true needs an MoE model (R3 replays the rollout's experts)")
    if view.get("grpo.async_grpo.enabled", False):
        raise RecipeError(
            "policy.router_replay.enabled=true does not work with grpo.async_grpo.enabled=true in NeMo-RL"
        )
    vpp = view.get("policy.megatron_cfg.virtual_pipeline_model_parallel_size", None)
    if vpp not in (None, 1):
        raise RecipeError("policy.router_replay.enabled=true does not support virtual pipeline parallelism in NeMo-RL")
    return True


def _topk(view: _View, settings: DPPOLossSettings) -> None:
    if not settings.needs_topk:
        return
    mode = f"loss_fn.mode={settings.core.mode}"
    g = "policy.generation"
    if view.get(f"{g}.top_p", 1.0) != 1.0 or view.get(f"{g}.top_k", None) not in (None, -1, 0):
        raise RecipeError(f"{mode} needs {g}.top_p=1.0 and top_k=null (π at the Top-K ids is the unfiltered softmax)")
    if view.get(f"{g}.vllm_cfg.async_engine", False):
        raise RecipeError(f"{mode} needs {g}.vllm_cfg.async_engine=false (Top-K plumbing covers the sync worker)")
    if view.get("policy.megatron_cfg.context_parallel_size", 1) != 1:
        raise RecipeError(f"{mode} needs policy.megatron_cfg.context_parallel_size=1 (π at the Top-K ids from logits)")
    if view.get("policy.sequence_packing.fuse_loss", False) and view.get("policy.sequence_packing.enabled", False):
        raise RecipeError(
            f"{mode} needs policy.sequence_packing.fuse_loss=false (the fused path passes log-probs only)"
        )
    max_logprobs = view.get(f"{g}.vllm_kwargs.max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS)
    if settings.topk > max_logprobs:
        raise RecipeError(
            f"loss_fn.topk={settings.topk} exceeds vLLM's max_logprobs={max_logprobs}; set "
            f"{g}.vllm_kwargs.max_logprobs ≥ {settings.topk}"
        )


def _precision(view: _View) -> None:
    precision = view.get("policy.precision")
    if precision not in PRECISIONS:
        raise RecipeError(f"policy.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    o = "policy.megatron_cfg.optimizer"
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        value = view.get(f"{o}.{flag}", None)
        if value is not None and bool(value) != (precision == dtype):
            raise RecipeError(f"{o}.{flag}={value} disagrees with policy.precision={precision}")


def _trainer(view: _View) -> None:
    if view.get("grpo.async_grpo.enabled", False):
        raise RecipeError("grpo.async_grpo.enabled=true: nemo_dppo.nemo_rl.run drives NeMo-RL's synchronous grpo_train")
    if (view.get("data_plane", None) or {}).get("enabled", False):
        raise RecipeError("data_plane.enabled=true: nemo_dppo.nemo_rl.run drives NeMo-RL's legacy grpo_train")
