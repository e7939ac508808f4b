"""Attention-head, KV-head and expert counts of the models the NeMo-RL recipes train (from their HF `config.json`).

The validator checks parallel sizes against them: Megatron's TP must divide the query heads and the KV heads
(query groups), its EP the number of experts; vLLM's TP must divide the query heads and either divide the KV heads
or be a multiple of them (vLLM then replicates KV heads).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """`num_experts` / `experts_per_token` are None for dense models."""

    attention_heads: int
    kv_heads: int
    num_experts: int | None = None
    experts_per_token: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None


QWEN3_30B_A3B = Architecture(attention_heads=32, kv_heads=4, num_experts=128, experts_per_token=8)
QWEN3_8B = Architecture(attention_heads=32, kv_heads=8)
QWEN3_1_7B = Architecture(attention_heads=16, kv_heads=8)
R1_DISTILL_QWEN_1_5B = Architecture(attention_heads=12, kv_heads=2)

#: HF model name → architecture. Base and post-trained checkpoints share the architecture.
ARCHITECTURES: dict[str, Architecture] = {
    "Qwen/Qwen3-30B-A3B-Base": QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B": QWEN3_30B_A3B,
    "Qwen/Qwen3-8B-Base": QWEN3_8B,
    "Qwen/Qwen3-8B": QWEN3_8B,
    "Qwen/Qwen3-1.7B-Base": QWEN3_1_7B,
    "Qwen/Qwen3-1.7B": QWEN3_1_7B,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": R1_DISTILL_QWEN_1_5B,
}
