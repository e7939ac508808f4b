"""Build the megatron-core GPT/MoE policy from an HF Qwen3-MoE directory with megatron-bridge's provider.

`AutoBridge.from_hf_pretrained(dir).to_megatron_provider()` translates the HF config (Qwen3MoEBridge) and loads
the HF weights into the parallel layout (TP / EP / ETP / PP shards) through a pre-wrap hook. On top of the
bridge's defaults this module sets what must match the `hf` training engine and what the machine supports:

- precision: fp32 parameters, or bf16 / fp16 parameters wrapped in megatron-core's `Float16Module` (the optimizer
  then keeps fp32 main parameters); the router always computes in fp32.
- routing: no auxiliary load-balancing loss unless the HF config enables one (`output_router_logits` with
  `router_aux_loss_coef > 0`, as HF training would), pre- or post-softmax top-k like the HF router
  (`norm_topk_prob`), and `moe_enable_routing_replay` so R3 uses megatron-core's native `RouterReplay`.
- layer spec: TransformerEngine's when `transformer_engine` is importable (GPU), otherwise the local spec
  (torch norms, SequentialMLP experts, unfused attention) with every fusion off — the CPU configuration.
- `calculate_per_token_loss=True`: data-parallel gradients are summed, not averaged, because each rank's loss
  already carries the global denominators (spec "Aggregation").
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_dppo.config import MegatronConfig
from nemo_dppo.errors import UserError
from nemo_dppo.megatron import cpu_compat
from nemo_dppo.megatron.bridge_import import import_auto_bridge

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


@dataclass
class MegatronPolicy:
    """The built model and what is needed to convert it back to HF."""

    bridge: Any  # megatron.bridge.AutoBridge for the HF directory
    config: Any  # the provider = megatron-core TransformerConfig of the model
    chunks: list[torch.nn.Module]  # one per virtual pipeline stage (here: one), DDP-wrapped when training
    hf_config: dict[str, Any]

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0]


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The HF `config.json` of `hf_dir`, checked to be a supported architecture (one-line `UserError` if not)."""
    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"HF model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json in HF model directory {path}")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = raw.get("architectures") or []
        raise UserError(
            f"{path}: architecture {model_type!r} {archs} is not supported by the Megatron backend "
            f"(supported model_type: {', '.join(SUPPORTED_MODEL_TYPES)}, e.g. Qwen3MoeForCausalLM)"
        )
    return raw


def num_experts(hf_config: dict[str, Any]) -> int:
    """Routed experts per MoE layer (`num_experts`; transformers 5 writes `num_local_experts`)."""
    return int(hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0)


def rope_theta(hf_config: dict[str, Any]) -> float:
    """RoPE base (`rope_theta`, or transformers 5's `rope_parameters.rope_theta`); only plain RoPE is supported."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"RoPE scaling {kind!r} is not supported by the Megatron backend (only default RoPE)")
    return float(hf_config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def check_layout(hf_config: dict[str, Any], layout: MegatronConfig) -> None:
    """One-line errors for layouts the model's shapes cannot be split into."""
    checks = [
        ("vocab_size", hf_config["vocab_size"], layout.tp, "tp"),
        ("num_key_value_heads", hf_config["num_key_value_heads"], layout.tp, "tp"),
        ("num_attention_heads", hf_config["num_attention_heads"], layout.tp, "tp"),
        ("num_experts", num_experts(hf_config), layout.ep, "ep"),
        ("num_hidden_layers", hf_config["num_hidden_layers"], layout.pp, "pp"),
        ("moe_intermediate_size", hf_config["moe_intermediate_size"], layout.etp, "etp"),
    ]
    for name, value, size, key in checks:
        if value % size:
            raise UserError(f"parallel size {key}={size} does not divide the model's {name}={value}")
    if not torch.cuda.is_available() and layout.ep > 1 and layout.etp > 1 and layout.moe_dispatcher == "alltoall":
        raise UserError(
            "ep > 1 with etp > 1 and the alltoall dispatcher needs uneven all-gathers, which gloo (CPU) cannot do; "
            "use train.megatron.moe_dispatcher=allgather or etp=1"
        )


def build_policy(
    hf_dir: str | Path,
    layout: MegatronConfig,
    *,
    precision: str = "fp32",
    load_weights: bool = True,
    wrap_with_ddp: bool = True,
) -> MegatronPolicy:
    """Build the policy for this rank's shard of `layout` (process groups must be initialised).

    `load_weights=False` leaves the parameters uninitialised-but-allocated (a checkpoint is loaded next).
    """
    hf_config = read_hf_config(hf_dir)
    check_layout(hf_config, layout)
    auto_bridge = import_auto_bridge()
    from megatron.core.transformer.moe.router_replay import RouterReplay

    path = str(Path(hf_dir).expanduser())
    try:
        if load_weights:
            bridge = auto_bridge.from_hf_pretrained(path, torch_dtype=torch.float32)
        else:  # the directory may hold only the config (a Megatron checkpoint's hf/)
            from transformers import AutoConfig

            bridge = auto_bridge.from_hf_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    except ValueError as err:
        raise UserError(f"megatron-bridge cannot load {hf_dir}: {str(err).splitlines()[0]}") from None
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    configure_provider(provider, hf_config, layout, precision)
    provider.finalize()
    RouterReplay.clear_global_router_replay_instances()  # class-global: drop routers of earlier models
    with cpu_compat.cuda_literals_to_cpu():
        chunks = provider.provide_distributed_model(
            wrap_with_ddp=False,
            use_cpu_initialization=not torch.cuda.is_available(),
            mixed_precision_wrapper=_float16_wrapper() if precision != "fp32" else None,
        )
        _restore_tensor_parallel_attributes(chunks)
        _mark_replicated_experts(chunks, layout)
        if wrap_with_ddp:
            chunks = [_wrap_ddp(chunk, provider) for chunk in chunks]
    return MegatronPolicy(bridge=bridge, config=provider, chunks=chunks, hf_config=hf_config)


def configure_provider(provider: Any, hf_config: dict[str, Any], layout: MegatronConfig, precision: str) -> None:
    """Parallel layout, precision, routing semantics and the layer spec (see the module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend

    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.expert_model_parallel_size = layout.ep
    provider.expert_tensor_parallel_size = layout.etp
    provider.sequence_parallel = layout.tp > 1 and layout.sequence_parallel
    if layout.tp > 1 and not layout.sequence_parallel:
        raise UserError("train.megatron.sequence_parallel=false with tp > 1: megatron-core's MoE layers need it")
    if layout.pp > 1:
        provider.pipeline_dtype = PRECISION_DTYPES[precision]

    dtype = PRECISION_DTYPES[precision]
    provider.params_dtype = dtype
    provider.bf16 = precision == "bf16"
    provider.fp16 = precision == "fp16"
    provider.autocast_dtype = dtype
    provider.moe_router_dtype = "fp32"
    provider.calculate_per_token_loss = True

    aux = bool(hf_config.get("output_router_logits")) and float(hf_config.get("router_aux_loss_coef") or 0) > 0
    provider.moe_router_load_balancing_type = "aux_loss" if aux else "none"
    provider.moe_aux_loss_coeff = float(hf_config.get("router_aux_loss_coef") or 0) if aux else 0.0
    provider.moe_router_pre_softmax = not hf_config.get("norm_topk_prob", True)
    provider.rotary_base = rope_theta(hf_config)  # megatron-bridge 0.3.1 misses transformers 5's rope_parameters
    provider.moe_token_dispatcher_type = layout.moe_dispatcher
    provider.moe_enable_routing_replay = True
    provider.moe_router_fusion = False
    provider.hidden_dropout = 0.0
    provider.attention_dropout = float(hf_config.get("attention_dropout") or 0.0)

    if transformer_engine_available():
        return  # the bridge's defaults: TransformerEngine spec, grouped GEMM, fused kernels
    provider.transformer_layer_spec = get_gpt_layer_local_spec(
        num_experts=provider.num_moe_experts,
        moe_grouped_gemm=False,
        qk_layernorm=provider.qk_layernorm,
        normalization=provider.normalization,
    )
    provider.attention_backend = AttnBackend.local
    provider.moe_grouped_gemm = False
    provider.moe_permute_fusion = False
    provider.gradient_accumulation_fusion = False
    provider.masked_softmax_fusion = False
    provider.bias_activation_fusion = False
    provider.bias_dropout_fusion = False
    provider.apply_rope_fusion = False
    provider.cross_entropy_loss_fusion = False
    provider.persist_layer_norm = False


def _restore_tensor_parallel_attributes(chunks: list[torch.nn.Module]) -> None:
    """megatron-core 0.16.1's parallel linear / embedding layers tag their weights `tensor_model_parallel=True`
    (+ partition dim) only inside weight initialisation, which megatron-bridge switches off when it loads HF
    weights; untagged shards then count as TP duplicates, and the gradient norm drops every TP rank but the
    first. Tag them as initialisation would have."""
    from megatron.core import tensor_parallel

    partition_dims = {
        tensor_parallel.ColumnParallelLinear: 0,
        tensor_parallel.RowParallelLinear: 1,
        tensor_parallel.VocabParallelEmbedding: 0,
    }
    for chunk in chunks:
        for module in chunk.modules():
            dim = next((d for cls, d in partition_dims.items() if isinstance(module, cls)), None)
            weight = getattr(module, "weight", None)
            if dim is None or weight is None or getattr(weight, "tensor_model_parallel", False):
                continue
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1


def _mark_replicated_experts(chunks: list[torch.nn.Module], layout: MegatronConfig) -> None:
    """With ep = 1 and etp < tp, every rank of a TP group holds whole experts and feeds them its own sequence-
    parallel slice of the tokens, so expert gradients must be summed over the expert-data-parallel group (which
    spans those TP ranks). megatron-core 0.16.1 marks expert parameters for that reduction (`allreduce=False`) only
    when ep > 1 and otherwise reduces them over the dense data-parallel group, dropping the other TP ranks'
    tokens: mark them here, before DDP assigns the gradient buffers."""
    if layout.ep > 1 or layout.etp >= layout.tp:
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".mlp.experts." in name:
                param.allreduce = False


def _float16_wrapper() -> Any:
    from megatron.core.transformer.module import Float16Module

    return Float16Module


def _wrap_ddp(chunk: torch.nn.Module, config: Any) -> torch.nn.Module:
    """Megatron DDP with fp32 gradient buffers; gradients summed over data-parallel ranks (per-token loss)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
