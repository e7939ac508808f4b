"""`loss.compile`: the loss's per-token pass through `torch.compile`, falling back to eager (a leaf: imports torch).

The pass (mode decision, coefficient, metric values) is dozens of elementwise ops over [B, T]; compiled, they fuse
into a few loops. Compiled fp32 results differ from eager in the last ulp (fused exp/log/expm1, reduction
order), so `off` is the default: `on` compiles and raises if compiling fails, `auto` compiles and falls back to
eager, with one warning, on any failure. One compiled function per (mode, config); shapes become dynamic after
the first recompile.
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
        _COMPILED[key] = _with_fallback(torch.compile(eager, dynamic=None), eager, key, cfg.compile)
    return _COMPILED[key]


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
