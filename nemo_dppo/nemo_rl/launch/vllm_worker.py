"""NeMo-RL's vLLM generation worker, asking vLLM for K log-probs per token and returning the rollout's Top-K.

NeMo-RL's worker (`nemo_rl/models/generation/vllm/vllm_worker.py`, v0.5–main) builds its `SamplingParams` in
`_build_sampling_params(*, greedy, stop_strings, max_new_tokens=None)` with `logprobs=0` (the sampled token only)
and keeps only the sampled token's log-prob in `generate`. This subclass

- overrides `_build_sampling_params` to set `logprobs=K` (K from the environment variable
  `NEMO_DPPO_LOGPROBS_TOPK`, which the driver sets before Ray starts; NeMo-RL forwards the driver's environment to
  every worker), and
- wraps `generate`: it records the `RequestOutput`s the worker gets from `self.llm.generate` and adds
  `generation_topk_ids` / `generation_topk_logprobs` [B, S, K] to the returned batch, in the layout of its
  `logprobs` output (`nemo_dppo.nemo_rl.launch.vllm_topk`).

vLLM caps log-probs per token at its engine argument `max_logprobs` (20 by default): for K > 20 set
`policy.generation.vllm_kwargs.max_logprobs`. This module imports nemo_rl, ray and (through nemo_rl) vLLM: it is
only imported inside NeMo-RL's vLLM worker processes, by the class path `TOPK_WORKER_FQN`, which the driver-side
plumbing (`nemo_dppo.nemo_rl.launch.topk_plumbing`) substitutes for NeMo-RL's own worker.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import ray

from nemo_dppo.nemo_rl import data_keys as keys
from nemo_dppo.nemo_rl.launch.topk_plumbing import TOPK_ENV, TOPK_WORKER_FQN
from nemo_dppo.nemo_rl.launch.vllm_topk import batch_topk

_nemo_rl_worker = importlib.import_module("nemo_rl.models.generation.vllm.vllm_worker")


def _worker_base() -> type:
    """NeMo-RL's undecorated sync worker class: `VllmGenerationWorkerImpl` (v0.7+) or the class under v0.5/v0.6's
    `@ray.remote` `VllmGenerationWorker`."""
    impl = getattr(_nemo_rl_worker, "VllmGenerationWorkerImpl", None)
    if impl is not None:
        return impl
    actor = _nemo_rl_worker.VllmGenerationWorker
    return actor.__ray_metadata__.modified_class


class TopKVllmGenerationWorkerImpl(_worker_base()):  # type: ignore[misc]
    """NeMo-RL's vLLM worker plus the rollout's Top-K log-probs (see the module docstring)."""

    @property
    def dppo_topk(self) -> int:
        return int(os.environ.get(TOPK_ENV, "20"))

    def _build_sampling_params(self, *args: Any, **kwargs: Any) -> Any:
        params = super()._build_sampling_params(*args, **kwargs)
        params.logprobs = max(int(params.logprobs or 0), self.dppo_topk)
        return params

    def generate(self, data: Any, greedy: bool = False) -> Any:
        captured: list[Any] = []
        llm = self.llm
        original = llm.generate

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            outputs = original(*args, **kwargs)
            captured.append(outputs)
            return outputs

        llm.generate = recording_generate  # an instance attribute shadowing the method, removed below
        try:
            result = super().generate(data, greedy=greedy)
        finally:
            del llm.generate
        if captured and len(data["input_ids"]) > 0:
            ids, logprobs = batch_topk(captured[-1], data["input_lengths"], data["input_ids"].shape[1], self.dppo_topk)
            if ids.shape[1] != result["logprobs"].shape[1]:
                raise RuntimeError(
                    f"Top-K layout has {ids.shape[1]} positions but NeMo-RL's logprobs have "
                    f"{result['logprobs'].shape[1]}: NeMo-RL's worker changed its output layout"
                )
            result[keys.TOPK_IDS] = ids
            result[keys.TOPK_LOGPROBS] = logprobs
        return result


#: The Ray actor class NeMo-RL's `RayWorkerBuilder` imports by its path, `TOPK_WORKER_FQN`.
TopKVllmGenerationWorker = ray.remote(TopKVllmGenerationWorkerImpl)
assert f"{__name__}.TopKVllmGenerationWorker" == TOPK_WORKER_FQN
