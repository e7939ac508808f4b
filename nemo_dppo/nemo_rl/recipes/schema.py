"""Known keys of the NeMo-RL config sections a recipe under `conf/nemo_rl/` may use.

Derived from NeMo-RL v0.7.0 (`examples/configs/grpo_math_1B.yaml`, `grpo_math_1B_megatron.yaml`, the
`MasterConfig` / `GRPOConfig` / `PolicyConfig` / `MegatronConfig` / vLLM config TypedDicts) plus the DPPO keys of
`loss_fn` (`nemo_dppo.nemo_rl.loss_settings`). A nested dict: a key maps to `LEAF` (a value), to a dict (a section
whose keys are checked) or to `OPEN` (a free-form section NeMo-RL passes through: environment settings, dataset
specs, logger back-ends, `vllm_kwargs`, ...).
"""

from __future__ import annotations

from typing import Any

from nemo_dppo.nemo_rl.loss_settings import LOSS_FN_KEYS

LEAF = "leaf"
OPEN = "open"

Schema = dict[str, Any]


def _leaves(*names: str) -> Schema:
    return dict.fromkeys(names, LEAF)


GRPO: Schema = {
    **_leaves(
        "num_prompts_per_step",
        "num_generations_per_prompt",
        "max_rollout_turns",
        "max_num_epochs",
        "max_num_steps",
        "normalize_rewards",
        "use_leave_one_out_baseline",
        "val_period",
        "val_at_start",
        "val_at_end",
        "overlong_filtering",
        "advantage_clip_low",
        "advantage_clip_high",
        "max_val_samples",
        "val_batch_size",
        "seed",
        "use_dynamic_sampling",
        "dynamic_sampling_max_gen_batches",
        "batch_multiplier",
        "seq_logprob_error_threshold",
        "invalid_tool_call_advantage",
        "malformed_thinking_advantage",
        "skip_reference_policy_logprobs_calculation",
        "calculate_advantages_on_gpu",
    ),
    "reward_shaping": _leaves(
        "enabled",
        "overlong_buffer_length",
        "overlong_buffer_penalty",
        "max_response_length",
        "stop_properly_penalty_coef",
    ),
    "adv_estimator": _leaves("name", "normalize_rewards", "use_leave_one_out_baseline", "minus_baseline"),
    "reward_scaling": _leaves("enabled", "source_min", "source_max", "target_min", "target_max"),
    "async_grpo": _leaves(
        "enabled", "max_trajectory_age_steps", "in_flight_weight_updates", "recompute_kv_cache_after_weight_updates"
    ),
}

MEGATRON: Schema = {
    **_leaves(
        "enabled",
        "force_reconvert_from_hf",
        "empty_unused_memory_level",
        "activation_checkpointing",
        "recompute_granularity",
        "recompute_modules",
        "tensor_model_parallel_size",
        "expert_tensor_parallel_size",
        "expert_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
        "context_parallel_size",
        "pipeline_dtype",
        "sequence_parallel",
        "freeze_moe_router",
        "moe_router_dtype",
        "moe_router_load_balancing_type",
        "moe_router_bias_update_rate",
        "moe_permute_fusion",
        "moe_grouped_gemm",
        "apply_rope_fusion",
        "bias_activation_fusion",
        "defer_fp32_logits",
        "moe_per_layer_logging",
        "moe_enable_deepep",
        "moe_token_dispatcher_type",
        "moe_shared_expert_overlap",
        "attention_backend",
        "mtp_num_layers",
        "mtp_loss_scaling_factor",
        "mtp_use_repeated_layer",
        "mtp_detach_heads",
        "gradient_accumulation_fusion",
        "use_fused_weighted_squared_relu",
    ),
    "env_vars": OPEN,
    "peft": _leaves(
        "enabled",
        "target_modules",
        "exclude_modules",
        "dim",
        "alpha",
        "dropout",
        "dropout_position",
        "lora_A_init_method",
        "lora_B_init_method",
        "a2a_experimental",
        "lora_dtype",
    ),
    "optimizer": _leaves(
        "optimizer",
        "lr",
        "min_lr",
        "weight_decay",
        "bf16",
        "fp16",
        "params_dtype",
        "adam_beta1",
        "adam_beta2",
        "adam_eps",
        "sgd_momentum",
        "use_distributed_optimizer",
        "use_precision_aware_optimizer",
        "clip_grad",
        "optimizer_cpu_offload",
        "optimizer_offload_fraction",
    ),
    "scheduler": _leaves(
        "start_weight_decay",
        "end_weight_decay",
        "weight_decay_incr_style",
        "lr_decay_style",
        "lr_decay_iters",
        "lr_warmup_iters",
        "lr_warmup_init",
    ),
    "distributed_data_parallel_config": _leaves(
        "grad_reduce_in_fp32",
        "overlap_grad_reduce",
        "overlap_param_gather",
        "use_custom_fsdp",
        "data_parallel_sharding_strategy",
    ),
    "fp8_cfg": _leaves("enabled", "fp8", "fp8_recipe", "fp8_param"),
}

VLLM: Schema = _leaves(
    "async_engine",
    "precision",
    "kv_cache_dtype",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "expert_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "use_tqdm",
    "use_deep_gemm",
    "num_last_layers_in_bf16",
    "num_first_layers_in_bf16",
    "enable_vllm_metrics_logger",
    "vllm_metrics_logger_interval",
    "enable_prefix_caching",
    "cap_max_tokens_to_context",
    "logprobs_mode",
)

GENERATION: Schema = {
    **_leaves(
        "port_range_low",
        "port_range_high",
        "backend",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop_token_ids",
        "stop_strings",
    ),
    "mcore_generation_config": OPEN,
    "vllm_cfg": VLLM,
    "vllm_kwargs": OPEN,
    "colocated": {"enabled": LEAF, "resources": _leaves("gpus_per_node", "num_nodes")},
}

POLICY: Schema = {
    **_leaves(
        "model_name",
        "train_global_batch_size",
        "train_micro_batch_size",
        "generation_batch_size",
        "logprob_batch_size",
        "max_total_sequence_length",
        "precision",
        "logprob_chunk_size",
        "offload_optimizer_for_logprob",
        "make_sequence_length_divisible_by",
        "max_grad_norm",
    ),
    "tokenizer": {"name": LEAF, "chat_template_kwargs": OPEN},
    "hf_config_overrides": OPEN,
    "dtensor_cfg": OPEN,
    "megatron_cfg": MEGATRON,
    "draft": _leaves("enabled", "model_name", "loss_weight", "num_layers", "aux_layer_indices"),
    "dynamic_batching": _leaves("enabled", "train_mb_tokens", "logprob_mb_tokens", "sequence_length_round"),
    "sequence_packing": _leaves(
        "enabled", "train_mb_tokens", "logprob_mb_tokens", "algorithm", "sequence_length_round", "fuse_loss"
    ),
    "optimizer": OPEN,
    "scheduler": OPEN,
    "generation": GENERATION,
    "router_replay": _leaves("enabled"),
}

RECIPE: Schema = {
    "grpo": GRPO,
    "loss_fn": _leaves(*LOSS_FN_KEYS),
    "checkpointing": {
        **_leaves(
            "enabled",
            "checkpoint_dir",
            "metric_name",
            "higher_is_better",
            "keep_top_k",
            "save_period",
            "checkpoint_must_save_by",
            "model_save_format",
            "save_consolidated",
            "save_optimizer",
        ),
        "pretrained_checkpoint": OPEN,
    },
    "policy": POLICY,
    "data": {
        **_leaves("max_input_seq_length", "shuffle", "num_workers", "use_multiple_dataloader"),
        "train": OPEN,
        "validation": OPEN,
        "default": OPEN,
    },
    "env": OPEN,
    "logger": {
        **_leaves(
            "log_dir",
            "num_val_samples_to_print",
            "wandb_enabled",
            "tensorboard_enabled",
            "mlflow_enabled",
            "swanlab_enabled",
            "monitor_gpus",
        ),
        "wandb": OPEN,
        "swanlab": OPEN,
        "tensorboard": OPEN,
        "mlflow": OPEN,
        "gpu_monitoring": _leaves("collection_interval", "flush_interval"),
    },
    "cluster": _leaves("gpus_per_node", "num_nodes", "master_port_range_low", "master_port_range_high", "segment_size"),
    "data_plane": OPEN,
    "on_policy_distillation": OPEN,
}


def unknown_keys(config: Any, schema: Schema = RECIPE, path: str = "") -> tuple[str, str, list[str]] | None:
    """The first key of `config` (nested dicts) absent from `schema`: (section path, key, valid keys), or None.

    A known section may also be null (NeMo-RL's way of removing a section, e.g. `policy.optimizer: null`).
    """
    if not isinstance(config, dict):
        return None
    for key, value in config.items():
        if key not in schema:
            return path, str(key), sorted(schema)
        sub = schema[key]
        if isinstance(sub, dict):
            found = unknown_keys(value, sub, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    return None
