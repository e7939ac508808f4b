"""Three fixes to megatron-bridge 0.3.1's weight conversion, for the local (non-TransformerEngine) layer spec.

0.3.1 is the last release that installs on Python 3.11. Its HF <-> Megatron conversion assumes the
TransformerEngine layer spec; with the local spec (the only one on CPU) it gets three things wrong, each fixed
here by wrapping one function at run time:

1. `scatter_to_tp_ranks` hands `torch.distributed.scatter` non-contiguous column shards (row-parallel weights are
   split along dim 1); gloo sends their raw storage, so TP ranks > 0 receive the wrong values. Shards are made
   contiguous first.
2. `_megatron_local_name_to_global` maps local expert numbers to global ones under expert parallelism only for
   TEGroupedMLP names (`experts.linear_fc1.weight3`), not for SequentialMLP names (`experts.local_experts.3.`), so
   every EP rank loaded experts 0..E/EP-1.
3. `gather_from_ep_ranks` (export) reads the expert number from a `.weight<N>` suffix, which SequentialMLP names
   lack; it now also reads `local_experts.<N>.`.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_APPLIED = False


#: The megatron-bridge release these fixes are written against; others are left untouched.
FIXED_RELEASE = "0.3."


def apply() -> None:
    """Install the fixes (idempotent; only for megatron-bridge 0.3.x). Call after `megatron.bridge` is imported."""
    global _APPLIED
    if _APPLIED or not importlib.metadata.version("megatron-bridge").startswith(FIXED_RELEASE):
        return
    from megatron.bridge.models.conversion import model_bridge, param_mapping
    from megatron.core import parallel_state

    mapping_cls = param_mapping.MegatronParamMapping
    original_scatter = mapping_cls.scatter_to_tp_ranks

    def scatter_to_tp_ranks(self: Any, splits: Any, *args: Any, **kwargs: Any) -> Any:
        if splits:
            splits = [s.contiguous() for s in splits]
        return original_scatter(self, splits, *args, **kwargs)

    mapping_cls.scatter_to_tp_ranks = scatter_to_tp_ranks

    original_to_global = model_bridge._megatron_local_name_to_global

    def local_name_to_global(models: Any, config: Any, param_name: str, vp_stage: int | None = None) -> str:
        param_name = original_to_global(models, config, param_name, vp_stage)
        ep_group = parallel_state.get_expert_model_parallel_group()
        match = _LOCAL_EXPERT.search(param_name)
        if match is None or ep_group.size() == 1 or ".adapter." in param_name:
            return param_name
        per_rank = config.num_moe_experts // ep_group.size()
        global_number = per_rank * ep_group.rank() + int(match.group(1))
        return param_name[: match.start(1)] + str(global_number) + param_name[match.end(1) :]

    model_bridge._megatron_local_name_to_global = local_name_to_global

    original_gather = mapping_cls.gather_from_ep_ranks

    def gather_from_ep_ranks(self: Any, megatron_weights: Any, megatron_module: Any, hf_param_name: Any) -> Any:
        match = _LOCAL_EXPERT.search(self.megatron_param)
        if match is None:
            return original_gather(self, megatron_weights, megatron_module, hf_param_name)
        # Present the SequentialMLP name in the TEGroupedMLP form the original parses (`...weight<global N>`).
        original_name = self.megatron_param
        suffix = ".bias" if original_name.endswith(".bias") else ".weight"
        self.megatron_param = f"{original_name}{match.group(1)}" if original_name.endswith(suffix) else original_name
        try:
            return original_gather(self, megatron_weights, megatron_module, hf_param_name)
        finally:
            self.megatron_param = original_name

    mapping_cls.gather_from_ep_ranks = gather_from_ep_ranks
    _APPLIED = True
