"""`python -m nemo_dppo.nemo_rl.run CONFIG [KEY=VALUE ...]`: NeMo-RL's GRPO training with `DPPOLossFn` as the loss.

Mirrors NeMo-RL's `examples/run_grpo.py` (v0.6 / v0.7; `run_grpo_math.py` in v0.5): load the config with its
`defaults:` and Hydra overrides → `init_ray` → tokenizer → generation config → datasets and environments →
`setup(...)` → **replace the returned ClippedPGLossFn by DPPOLossFn** → `grpo_train(...)`. Before anything starts
the recipe is validated (`nemo_dppo.nemo_rl.recipes.recipe_validator`); for Top-K modes the Top-K plumbing is installed
(`nemo_dppo.nemo_rl.launch.topk_plumbing`) before Ray starts, so the workers inherit K.

Errors a user can fix (bad recipe, NeMo-RL missing or too old) print one `error:` line and exit 2.

Installing NeMo-RL (it is not on PyPI) and nemo-dppo next to it:

    # NeMo-RL's NGC container (CUDA, vLLM, Megatron and the workers' venvs prebuilt), with a NeMo-RL checkout
    # mounted at /opt/nemo-rl as its docs describe, and nemo-dppo mounted next to it:
    docker run --rm -it --gpus all --shm-size=64g -v $PWD/nemo-rl:/opt/nemo-rl -v $PWD/nemo-dppo:/opt/nemo-dppo \
        -w /opt/nemo-rl nvcr.io/nvidia/nemo-rl:latest bash
    # (bare metal: git clone --recursive https://github.com/NVIDIA-NeMo/RL and follow its installation guide)

    # nemo-dppo must be importable in the driver and in every Ray worker (the vLLM workers import
    # nemo_dppo.nemo_rl.launch.vllm_worker for Top-K modes, the Megatron workers unpickle DPPOLossFn):
    export PYTHONPATH=/opt/nemo-dppo:$PYTHONPATH    # NeMo-RL forwards the driver's environment to its workers
    # (or `uv pip install --no-deps -e /opt/nemo-dppo` into each worker venv; the loss needs only torch)

    uv run python -m nemo_dppo.nemo_rl.run /opt/nemo-dppo/conf/nemo_rl/qwen3_30b_a3b_base.yaml \
        loss_fn.mode=dppo_binary_kl

On a Slurm cluster launch it through NeMo-RL's `ray.sub` (`COMMAND="uv run python -m nemo_dppo.nemo_rl.run ..."
CONTAINER=... MOUNTS=... sbatch --nodes=2 ray.sub`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

from nemo_dppo.nemo_rl import versions
from nemo_dppo.nemo_rl.launch.topk_plumbing import PlumbingError, install_topk_plumbing
from nemo_dppo.nemo_rl.loss import DPPOLossFn
from nemo_dppo.nemo_rl.loss_settings import LossSettingsError
from nemo_dppo.nemo_rl.recipes.recipe_loading import RecipeLoadError, register_resolvers
from nemo_dppo.nemo_rl.recipes.recipe_validator import RecipeError, validate_file

INSTALL_HINT = (
    "NeMo-RL is not installed (it is not on PyPI): run inside NeMo-RL's container (docker pull "
    "nvcr.io/nvidia/nemo-rl:latest) or a git checkout (git clone --recursive https://github.com/NVIDIA-NeMo/RL, then "
    "`uv run python -m nemo_dppo.nemo_rl.run ...` from it), with nemo-dppo on PYTHONPATH"
)


class NemoRLUnavailable(RuntimeError):
    """NeMo-RL is missing, broken or older than this entry point supports; the message is one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_dppo.nemo_rl.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", metavar="CONFIG", help="recipe YAML in NeMo-RL's format (conf/nemo_rl/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra-grammar overrides")
    args = parser.parse_args(argv)
    try:
        summary = validate_file(args.config, args.overrides)
        print(f"recipe {args.config}: {summary.line()}", flush=True)
        grpo = import_nemo_rl()
        run_grpo(grpo, args.config, args.overrides)
    except (RecipeError, RecipeLoadError, LossSettingsError, PlumbingError, NemoRLUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def import_nemo_rl() -> Any:
    """NeMo-RL's `nemo_rl.algorithms.grpo` module with the API this entry point calls, or `NemoRLUnavailable`."""
    grpo = _nemo_rl_module("nemo_rl.algorithms.grpo")
    for name in ("setup", "grpo_train"):
        if not callable(getattr(grpo, name, None)):
            raise NemoRLUnavailable(f"this entry point needs NeMo-RL 0.6–0.7 or main: nemo_rl.algorithms.grpo.{name} "
                                    "does not exist in the installed NeMo-RL")  # fmt: skip
    return grpo


def unavailable_message(module: str, error: BaseException) -> str:
    """One line saying what is needed when importing NeMo-RL's `module` raised `error` (any exception)."""
    if isinstance(error, ModuleNotFoundError) and error.name and error.name.split(".")[0] == "nemo_rl":
        if error.name == "nemo_rl":
            return INSTALL_HINT
        return f"this entry point needs NeMo-RL 0.6–0.7 or main: the installed NeMo-RL has no module {error.name}"
    if isinstance(error, ModuleNotFoundError) and error.name:
        return (f"NeMo-RL is installed but its dependency '{error.name.split('.')[0]}' is missing: run inside "
                "NeMo-RL's container or its `uv run` environment (`uv sync` in the NeMo-RL checkout)")  # fmt: skip
    detail = " ".join(str(error).split())[:300]
    if sys.version_info < (3, 12) and ("TypedDict" in detail or "Python" in detail or isinstance(error, SyntaxError)):
        return (f"NeMo-RL needs Python ≥ 3.12 (its releases declare ≥ 3.13); this is Python "
                f"{sys.version_info.major}.{sys.version_info.minor}: run inside NeMo-RL's container or `uv run` "
                f"environment (importing {module} failed: {type(error).__name__}: {detail})")  # fmt: skip
    return f"NeMo-RL is installed but importing {module} failed: {type(error).__name__}: {detail}"


def run_grpo(grpo: Any, config_path: str, overrides: Sequence[str]) -> None:
    """NeMo-RL's GRPO entry point with the loss replaced (see the module docstring).

    A failure while NeMo-RL sets up (config, Ray, tokenizer, data, workers) is one `NemoRLUnavailable` line
    (`NEMO_DPPO_DEBUG=1` re-raises it with its traceback); failures inside `grpo_train` propagate unchanged."""
    try:
        train_args = _setup(grpo, config_path, overrides)
    except (LossSettingsError, PlumbingError, NemoRLUnavailable):
        raise
    except Exception as error:  # NeMo-RL setup can fail in many ways: one line each
        if os.environ.get("NEMO_DPPO_DEBUG") == "1":
            raise
        detail = " ".join(str(error).split())[:300]
        raise NemoRLUnavailable(
            f"NeMo-RL's GRPO setup failed: {type(error).__name__}: {detail} (NEMO_DPPO_DEBUG=1 shows the traceback)"
        ) from None
    grpo.grpo_train(*train_args)


def _setup(grpo: Any, config_path: str, overrides: Sequence[str]) -> tuple[Any, ...]:
    """Everything before `grpo_train`: NeMo-RL's config, Ray, tokenizer, data and `setup()`, with the loss swapped."""
    from omegaconf import OmegaConf

    config_utils = _nemo_rl_module("nemo_rl.utils.config")
    getattr(config_utils, "register_omegaconf_resolvers", register_resolvers)()
    config = config_utils.load_config(config_path)
    if overrides:
        config = config_utils.parse_hydra_overrides(config, list(overrides))
    plain = OmegaConf.to_container(config, resolve=True)
    assert isinstance(plain, dict)
    loss_fn = DPPOLossFn(plain["loss_fn"], max_new_tokens=plain["policy"]["generation"]["max_new_tokens"])
    master = versions.master_config(grpo, plain)

    logger_config = versions.section(master, "logger")
    logger_config["log_dir"] = _nemo_rl_module("nemo_rl.utils.logger").get_next_experiment_dir(logger_config["log_dir"])
    if loss_fn.topk:
        install_topk_plumbing(loss_fn.topk)  # before Ray starts: the workers inherit K through the environment
    _nemo_rl_module("nemo_rl.distributed.virtual_cluster").init_ray()

    policy = versions.section(master, "policy")
    tokenizer = _nemo_rl_module("nemo_rl.algorithms.utils").get_tokenizer(policy["tokenizer"])
    policy["generation"] = _configure_generation(policy, tokenizer)
    setup_response_data = _nemo_rl_attr("nemo_rl.data.utils", "setup_response_data")
    dataset, val_dataset, task_to_env, val_task_to_env = setup_response_data(
        tokenizer, versions.section(master, "data"), versions.section(master, "env")
    )
    outputs = list(grpo.setup(master, tokenizer, dataset, val_dataset))
    at = _loss_position(outputs)
    print(f"loss: {loss_fn!r} replaces NeMo-RL's {type(outputs[at]).__name__}", flush=True)
    outputs[at] = loss_fn
    return (
        outputs[0],  # policy
        outputs[1],  # policy_generation
        outputs[at - 2],  # dataloader
        outputs[at - 1],  # val_dataloader
        tokenizer,
        loss_fn,
        task_to_env,
        val_task_to_env,
        *outputs[at + 1 : at + 5],  # logger, checkpointer, grpo_save_state, master_config
    )


def _configure_generation(policy: Any, tokenizer: Any) -> Any:
    """`configure_generation_config` with the keyword arguments the installed version accepts."""
    configure = _nemo_rl_attr("nemo_rl.models.generation", "configure_generation_config")
    extra = versions.generation_kwargs(policy, inspect.signature(configure).parameters)
    return configure(policy["generation"], tokenizer, **extra)


def _loss_position(outputs: list[Any]) -> int:
    at = versions.loss_position(outputs)
    if at is None:
        raise NemoRLUnavailable(
            "NeMo-RL's setup() did not return its ClippedPGLossFn where expected; this entry point supports NeMo-RL "
            "0.6–0.7 (use DPPOLossFn in your own copy of examples/run_grpo.py otherwise)"
        )
    return at


def _nemo_rl_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:  # any failure inside NeMo-RL import: one line
        raise NemoRLUnavailable(unavailable_message(name, error)) from None


def _nemo_rl_attr(module: str, name: str) -> Any:
    found = getattr(_nemo_rl_module(module), name, None)
    if found is None:
        raise NemoRLUnavailable(f"this entry point needs NeMo-RL 0.6–0.7 or main: {module}.{name} does not exist")
    return found


if __name__ == "__main__":
    sys.exit(main())
