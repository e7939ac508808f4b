"""Run megatron-core 0.16.1 on a machine without CUDA: every work-around in one place, applied only then.

megatron-core is written for GPUs; on CPU (gloo process groups, the local layer spec) it needs these patches, all
made at run time (nothing in site-packages is edited) and all inert on a machine that has CUDA:

1. CUDA RNG tracker → the CPU generator: `torch.cuda.get_rng_state / set_rng_state / manual_seed` and
   `tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state`; `torch.cuda.manual_seed_all` → no-op.
   The tracker only forks and restores the state, so the process's CPU RNG stream is left as it was.
2. `torch.cuda.current_device()` → `"cpu"` (rotary embeddings, TP gathers allocate on it).
3. `get_default_causal_mask` hard-codes `device="cuda"` (in `transformer.utils` and `fusions.fused_softmax`).
4. The alltoall token dispatcher: `torch.cuda.Stream / stream / current_stream` → inert stand-ins; its split sizes
   must be host integers (`maybe_move_tensor_to_cpu` only converts CUDA tensors).
5. MoE with TP > 1 in training needs sequence parallelism, which the torch norms of the local spec refuse: the norm
   is built with `sequence_parallel=False` and its parameters tagged `.sequence_parallel = True`, so
   `finalize_model_grads` still all-reduces their gradients over the TP group.
6. `device="cuda"` literals and `tensor.type() == "torch.cuda.FloatTensor"` checks in the optimizer, grad scaler,
   DDP buffers and schedules: `cuda_literals_to_cpu()` is a `TorchFunctionMode` that maps them, entered only
   around those calls; `native_torch()` suspends it again inside them for the model's forward and the loss
   (the mode's Python dispatch costs ~25% of a tiny model's forward-backward).
7. 0.16.1 without TransformerEngine leaves `moe_utils.te_general_gemm` undefined: set it to None.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False

#: tensor.type() names on CPU → the CUDA names megatron-core compares against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
}


def needed() -> bool:
    """True when this process has no CUDA device (the patches are for CPU-only runs)."""
    return not torch.cuda.is_available()


def apply() -> None:
    """Install the CPU work-arounds (idempotent; does nothing when CUDA is available)."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    _patch_rng()
    _patch_devices_and_masks()
    _patch_token_dispatcher()
    _patch_torch_norm()
    _patch_te_symbols()
    _APPLIED = True


# --- 1. RNG --------------------------------------------------------------------------------------------------


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    torch.cuda.manual_seed = manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


# --- 2, 3. Devices and the causal mask -----------------------------------------------------------------------


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_devices_and_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask


# --- 4. The alltoall token dispatcher ------------------------------------------------------------------------


class _InertStream:
    """Stands for a CUDA stream / event on CPU: every operation is a no-op, in-order execution is already given."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def wait_stream(self, _other: Any) -> None:
        pass

    def wait_event(self, _event: Any) -> None:
        pass

    def record_event(self, *_args: Any) -> _InertStream:
        return self

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _InertStream)

    def __hash__(self) -> int:
        return 0


def _host_values(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """`maybe_move_tensor_to_cpu` for CPU tensors: the split sizes must become host numbers (numpy)."""
    if torch.is_tensor(tensor):
        tensor = tensor.detach().cpu()
        return tensor.numpy() if as_numpy else tensor
    return tensor


def _patch_token_dispatcher() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    torch.cuda.Stream = _InertStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _InertStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *_a, **_k: _InertStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *_a, **_k: _InertStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *_a, **_k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *_a, **_k: None  # type: ignore[assignment]
    moe_utils.maybe_move_tensor_to_cpu = _host_values
    token_dispatcher.maybe_move_tensor_to_cpu = _host_values


# --- 5. Torch norms under sequence parallelism ---------------------------------------------------------------


def _patch_torch_norm() -> None:
    from megatron.core.models import backends
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls, config, *args, **kwargs)
        norm = original_new(cls, dataclasses.replace(config, sequence_parallel=False), *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True  # all-reduced over TP by finalize_model_grads
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new  # type: ignore[method-assign]
    backends.WrappedTorchNorm = torch_norm.WrappedTorchNorm


# --- 7. TransformerEngine symbols ----------------------------------------------------------------------------


def _patch_te_symbols() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --- 6. device="cuda" literals -------------------------------------------------------------------------------


def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu"  # a CUDA device index
    return value


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Maps `device="cuda"` to CPU, `tensor.cuda()` to the tensor itself and CPU `tensor.type()` names to the CUDA
    names megatron-core asserts on."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return func(*args, **kwargs)


def native_torch() -> contextlib.AbstractContextManager:
    """Suspends `cuda_literals_to_cpu` (and any torch-function mode) for code that needs no mapping."""
    return torch._C.DisableTorchFunction() if needed() else contextlib.nullcontext()


@contextlib.contextmanager
def cuda_literals_to_cpu() -> Iterator[None]:
    """Around megatron-core calls that allocate on `"cuda"` or check CUDA type names (no-op with CUDA)."""
    if not needed():
        yield
        return
    with _CudaLiteralsToCpu():
        yield
