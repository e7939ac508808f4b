"""Driver-side plumbing that carries the rollout's Top-K log-probs from vLLM into NeMo-RL's training batch.

NeMo-RL (≥ 0.7) moves per-token rollout data along this path, all in the driver process except the first step:

1. vLLM worker `generate` → `BatchedDataDict` with `logprobs` [B, S]   → replaced by our worker subclass
   (`nemo_dppo.nemo_rl.launch.vllm_worker`), which adds `generation_topk_ids` / `generation_topk_logprobs` [B, S, K];
   `VllmGeneration` picks the worker class through `resolve_generation_worker_cls` (patched to return ours) and
   looks its Python environment up in `ACTOR_ENVIRONMENT_REGISTRY` (ours registered with vLLM's).
2. `rollouts.generate_responses` slices each sample's generated part into the assistant message
   (`generation_logprobs`)                                               → wrapped: the Top-K slices go alongside.
3. `grpo.add_grpo_token_loss_masks_and_generation_logprobs` fills missing per-token fields of every message before
   `batched_message_log_to_flat_message` concatenates messages and pads to [B, S, ...] → wrapped: prompt messages
   get zero [n, K] Top-K tensors first (a key missing from some messages would misalign the concatenation).
4. `grpo_train` builds `train_data` from a whitelist of flat-message keys, then calls
   `grpo._preserve_router_replay_routed_experts(train_data, flat_messages, ...)` to add R3's routes
                                                                         → wrapped: it adds the Top-K keys too.

From there NeMo-RL's batch machinery (sharding over DP, micro-batching, sequence-packing's per-sequence slicing)
handles [B, S, K] tensors like its own [B, S, L, K] `routed_experts`. Only the synchronous vLLM worker and
`grpo_train` (not async GRPO, NeMo-Gym or the TransferQueue data plane) are covered; the validator rejects the rest.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from nemo_dppo.nemo_rl import data_keys as keys

#: Environment variable carrying K from the driver to the vLLM workers (NeMo-RL forwards the driver's environment).
TOPK_ENV = "NEMO_DPPO_LOGPROBS_TOPK"
TOPK_WORKER_FQN = "nemo_dppo.nemo_rl.launch.vllm_worker.TopKVllmGenerationWorker"
NEMO_RL_WORKER_FQN = "nemo_rl.models.generation.vllm.vllm_worker.VllmGenerationWorker"
_MARK = "__nemo_dppo_topk__"


class PlumbingError(RuntimeError):
    """The installed NeMo-RL lacks a hook the Top-K plumbing needs; the message is one line."""


# --- pure helpers (the data transformations, testable without NeMo-RL) ------------------------------------------


def attach_topk_to_responses(
    message_logs: Sequence[list[MutableMapping[str, Any]]],
    generation_outputs: Mapping[str, Any],
    input_lengths: Sequence[int] | torch.Tensor,
) -> None:
    """Give each sample's just-appended assistant message its generated part of the [B, S, K] Top-K outputs.

    Mirrors how NeMo-RL slices `logprobs[i, input_length:total_length]` into `generation_logprobs`.
    """
    if keys.TOPK_IDS not in generation_outputs:
        return
    ends = generation_outputs["unpadded_sequence_lengths"]
    for i, log in enumerate(message_logs):
        start, end = int(input_lengths[i]), int(ends[i])
        message = log[-1]
        message[keys.TOPK_IDS] = generation_outputs[keys.TOPK_IDS][i, start:end]
        message[keys.TOPK_LOGPROBS] = generation_outputs[keys.TOPK_LOGPROBS][i, start:end]


def backfill_topk(message_logs: Sequence[Sequence[MutableMapping[str, Any]]], k: int) -> None:
    """Zero [n, K] Top-K tensors on every message without them (prompts, environment turns), so that flattening
    concatenates a value for every token."""
    for log in message_logs:
        for message in log:
            if keys.TOPK_IDS in message:
                continue
            n = len(message["token_ids"])
            message[keys.TOPK_IDS] = torch.zeros(n, k, dtype=torch.long)
            message[keys.TOPK_LOGPROBS] = torch.zeros(n, k, dtype=torch.float32)


def copy_topk_keys(target: MutableMapping[str, Any], flat_messages: Mapping[str, Any]) -> None:
    """Copy the flattened [B, S, K] Top-K tensors into the training batch (the one carrying `generation_logprobs`)."""
    if keys.GENERATION_LOGPROBS in target and keys.TOPK_IDS in flat_messages:
        target[keys.TOPK_IDS] = flat_messages[keys.TOPK_IDS]
        target[keys.TOPK_LOGPROBS] = flat_messages[keys.TOPK_LOGPROBS]


# --- installation into NeMo-RL (driver process) -----------------------------------------------------------------


def install_topk_plumbing(k: int) -> None:
    """Patch the installed NeMo-RL so that rollouts carry K log-probs per token into the training batch. Idempotent."""
    os.environ[TOPK_ENV] = str(k)
    registry = _module("nemo_rl.distributed.ray_actor_environment_registry")
    table = _attribute(registry, "ACTOR_ENVIRONMENT_REGISTRY")
    table[TOPK_WORKER_FQN] = table[NEMO_RL_WORKER_FQN]

    generation = _module("nemo_rl.models.generation.vllm.vllm_generation")
    _wrap(generation, "resolve_generation_worker_cls", _use_topk_worker)
    rollouts = _module("nemo_rl.experience.rollouts")
    _wrap(rollouts, "generate_responses", _attach_after_generate)
    grpo = _module("nemo_rl.algorithms.grpo")
    _wrap(grpo, "add_grpo_token_loss_masks_and_generation_logprobs", functools.partial(_backfill_first, k=k))
    _wrap(grpo, "_preserve_router_replay_routed_experts", _copy_after_preserve)


def _use_topk_worker(original: Callable[..., str], default_cls: str, *args: Any, **kwargs: Any) -> str:
    resolved = original(default_cls, *args, **kwargs)
    return TOPK_WORKER_FQN if resolved == NEMO_RL_WORKER_FQN else resolved


def _attach_after_generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    bound = inspect.signature(original).bind(*args, **kwargs)
    recorder = _RecordingGeneration(bound.arguments["policy_generation"])
    bound.arguments["policy_generation"] = recorder
    result = original(*bound.args, **bound.kwargs)
    batch = result[0]
    if recorder.outputs is not None:
        attach_topk_to_responses(batch["message_log"], recorder.outputs, bound.arguments["input_lengths"])
    return result


def _backfill_first(original: Callable[..., Any], message_logs: Any, *args: Any, k: int, **kwargs: Any) -> Any:
    backfill_topk(message_logs, k)
    return original(message_logs, *args, **kwargs)


def _copy_after_preserve(
    original: Callable[..., Any], target: Any, flat_messages: Any, *args: Any, **kwargs: Any
) -> Any:
    result = original(target, flat_messages, *args, **kwargs)
    copy_topk_keys(target, flat_messages)
    return result


class _RecordingGeneration:
    """Stands in for the generation object inside `generate_responses`, keeping what its `generate` returned."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.outputs: Mapping[str, Any] | None = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.outputs = self._inner.generate(*args, **kwargs)
        return self.outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise PlumbingError(f"Top-K loss modes need NeMo-RL ≥ 0.7: cannot import {name} ({error})") from None


def _attribute(module: Any, name: str) -> Any:
    if not hasattr(module, name):
        raise PlumbingError(f"Top-K loss modes need NeMo-RL ≥ 0.7: {module.__name__}.{name} does not exist")
    return getattr(module, name)


def _wrap(module: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Replace `module.name` by `wrapper(original, *args, **kwargs)` (once)."""
    original = _attribute(module, name)
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(patched, _MARK, True)
    setattr(module, name, patched)
