"""Import megatron-bridge (HF <-> Megatron weight conversion) on a machine without TransformerEngine or triton.

megatron-bridge 0.3.1 imports `transformer_engine` (LoRA layers) and `triton` (kernels) at module level although
the conversion path used here needs neither. The import is made to succeed by putting permissive stand-in modules
into `sys.modules` for the duration of `import megatron.bridge` only, and removing them right after: a fake
`transformer_engine` left behind would make megatron-core believe TransformerEngine is installed. megatron-core is
imported first, so that it detects the real (absent) TransformerEngine before the stand-ins exist.

On Python 3.11 `typing.override` (3.12+) is also provided from `typing_extensions`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import typing
import warnings
from typing import Any

import typing_extensions

from nemo_dppo.errors import UserError
from nemo_dppo.megatron import bridge_compat

#: Modules that are replaced by stand-ins while megatron.bridge is imported, when they are not installed.
_OPTIONAL_MODULES = ("transformer_engine", "transformer_engine.pytorch", "triton", "triton.language")

#: megatron-core modules that megatron.bridge 0.3.1 imports. They decide at import time whether TransformerEngine
#: exists (`HAVE_TE`), so they are imported before any stand-in is in place.
_CORE_MODULES_FIRST = (
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.gpt.moe_module_specs",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs",
    "megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs",
    "megatron.core.models.mamba.mamba_model",
    "megatron.core.models.mamba.mamba_layer_specs",
    "megatron.core.models.T5.t5_model",
    "megatron.core.models.multimodal.llava_model",
    "megatron.core.models.vision.vit_layer_specs",
    "megatron.core.models.vision.radio",
    "megatron.core.extensions.kitchen",
    "megatron.core.extensions.transformer_engine_spec_provider",
    "megatron.core.fusions.fused_bias_dropout",
    "megatron.core.fusions.fused_mla_yarn_rope_apply",
    "megatron.core.post_training.modelopt.gpt.model_specs",
    "megatron.core.post_training.modelopt.mamba.model_specs",
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.ssm.gated_delta_net",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.custom_layers.transformer_engine",
    "megatron.core.transformer.experimental_attention_variant.dsa",
    "megatron.core.transformer.heterogeneous.linear_replacements",
)


class _AnythingMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _Anything(metaclass=_AnythingMeta):
    """Stands for any class, function or constant of a missing module; attribute access returns itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __class_getitem__(cls, item: Any) -> type:
        return cls


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything


def _is_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def quiet_import_warnings() -> None:
    """megatron-core / -bridge warn at import about every optional GPU package that is absent (expected on CPU)."""
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|TransformerEngine).*", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch_dtype.*is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*", category=UserWarning)


def import_auto_bridge() -> type:
    """`megatron.bridge.AutoBridge`, imported without TransformerEngine / triton; raises `UserError` if missing."""
    quiet_import_warnings()
    if "megatron.bridge" in sys.modules:
        return sys.modules["megatron.bridge"].AutoBridge
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"train.backend=megatron needs megatron-core (pip install megatron-core==0.16.1): {err}"
        ) from None
    for name in _CORE_MODULES_FIRST:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    before = set(sys.modules)
    stand_ins = [name for name in _OPTIONAL_MODULES if not _is_installed(name) and name not in sys.modules]
    for name in stand_ins:
        sys.modules[name] = _StandInModule(name)
    for name in stand_ins:
        parent, _, child = name.rpartition(".")
        if parent in stand_ins:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        from megatron.bridge import AutoBridge
    except ImportError as err:
        raise UserError(
            f"train.backend=megatron needs megatron-bridge (pip install --no-deps megatron-bridge==0.3.1): {err}"
        ) from None
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    fooled = [m for m in set(sys.modules) - before if m.startswith("megatron.core") and _believes_in_te(m)]
    if fooled:
        raise RuntimeError(f"megatron-core modules imported while TransformerEngine was stubbed: {sorted(fooled)}")
    bridge_compat.apply()
    return AutoBridge


def _believes_in_te(module_name: str) -> bool:
    """Whether a module imported during the stand-in window concluded that TransformerEngine is installed."""
    return bool(getattr(sys.modules.get(module_name), "HAVE_TE", False)) and not _is_installed("transformer_engine")
