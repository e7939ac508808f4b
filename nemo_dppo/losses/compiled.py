"""`loss.compile`: a mode's decision + coefficient through `torch.compile`, falling back to eager (a leaf).

The decision is a dozen elementwise ops over [B, T] (Binary-KL: two expm1, a log, …); compiled, they fuse into one
loop. Compiled fp32 results differ from eager in the last ulp (inductor's own exp/log), so `off` is the default:
`on` compiles and raises if compiling fails, `auto` compiles and falls back to eager, with one warning, on any
failure. Inductor's CPU expm1 (torch 2.13) computes exp(x) − 1 and so loses all precision for |x| ≪ 1 — where
1 − p of a confident token lives — so it is made to call ATen's expm1 (exact, as eager) before anything compiles.
One compiled function per (mode, config); shapes become dynamic after the first recompile.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

COMPILE_CHOICES = ("off", "on", "auto")

_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}


def per_token_pass(fn: Callable[..., Any], mode: Any, cfg: Any) -> Callable[..., Any]:
    """`fn` with `mode` and `cfg` bound, compiled when `cfg.compile` asks for it."""
    eager = partial(fn, mode, cfg)
    if cfg.compile == "off":
        return eager
    key = (mode.name, dataclasses.astuple(cfg))
    if key not in _COMPILED:
        _COMPILED[key] = _with_fallback(_compile(eager), eager, key, cfg.compile)
    return _COMPILED[key]


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(fn)` with expm1 left to ATen; a failure to arrange that surfaces at the first call."""
    try:
        _aten_expm1_in_inductor()
    except Exception as err:  # private inductor API: if it moved, compiling is not safe here
        return partial(_raise, RuntimeError(f"cannot keep inductor off expm1: {err!r}"))
    return torch.compile(fn, dynamic=None)


def _raise(err: Exception, *args: Any) -> Any:
    raise err


def _aten_expm1_in_inductor() -> None:
    """Once per process: inductor lowers aten.expm1 to a call of ATen's kernel instead of generating exp − 1."""
    from torch._inductor import lowering

    expm1 = torch.ops.aten.expm1
    if expm1.default not in lowering.fallbacks:
        lowering.lowerings.pop(expm1.default, None)
        lowering.make_fallback(expm1, warn=False)


def _with_fallback(
    compiled: Callable[..., Any], eager: Callable[..., Any], key: tuple[Any, ...], setting: str
) -> Callable[..., Any]:
    """Call `compiled`; on a failure that eager does not share, raise (`on`) or switch to eager for good (`auto`)."""

    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as err:
            result = eager(*args)  # an input error raises here too, and is the caller's to see
            if setting == "on":
                raise RuntimeError(f"loss.compile=on: torch.compile failed ({err!r}); use auto or off") from err
            warnings.warn(f"loss.compile=auto: torch.compile failed ({err!r}); the loss runs eagerly", stacklevel=2)
            _COMPILED[key] = eager
            return result

    return call
