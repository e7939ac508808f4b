"""The engine seam: every engine in the name tables implements the protocol the trainer uses, and the trainer and
`nemo-dppo eval` make engines from the same table."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from nemo_dppo.engines import ROLLOUT_ENGINES, TRAINING_ENGINES, engine_class
from nemo_dppo.engines.base import RolloutEngine, TrainingEngine

PACKAGE = Path(__file__).resolve().parent.parent / "nemo_dppo"


def _protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}  # fmt: skip


def _check(cls: type, protocol: type, attributes: tuple[str, ...]) -> None:
    for name, expected in _protocol_methods(protocol).items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        got = inspect.signature(getattr(cls, name))
        want = [p.name for p in expected.parameters.values() if p.kind is not p.VAR_KEYWORD]
        have = [p.name for p in got.parameters.values()]
        assert have[: len(want)] == want, f"{cls.__name__}.{name}{got} does not match the protocol {expected}"
        extra = [p for p in list(got.parameters.values())[len(want):] if p.default is inspect.Parameter.empty]
        assert not extra, f"{cls.__name__}.{name} needs arguments the protocol does not pass: {extra}"
    assert callable(getattr(cls, "from_config", None)), f"{cls.__name__} has no from_config"
    source = inspect.getsource(cls)
    for attribute in attributes:  # set in __init__ (instances are heavy to build here; the trainer tests do)
        assert f"self.{attribute} =" in source, f"{cls.__name__} never sets {attribute}"


@pytest.mark.parametrize("name", sorted(ROLLOUT_ENGINES))
def test_rollout_engines_implement_the_protocol(name):
    _check(engine_class(ROLLOUT_ENGINES, name, "rollout"), RolloutEngine, ("pad_id",))


@pytest.mark.parametrize("name", sorted(TRAINING_ENGINES))
def test_training_engines_implement_the_protocol(name):
    pytest.importorskip("megatron.core") if name == "megatron" else None
    _check(engine_class(TRAINING_ENGINES, name, "training"), TrainingEngine, ("is_moe",))


def test_unknown_engine_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'; valid: hf, vllm"):
        engine_class(ROLLOUT_ENGINES, "sglang", "rollout")


def test_eval_uses_the_training_table():
    from nemo_dppo.evaluate import ENGINE_FACTORIES

    assert set(ENGINE_FACTORIES) == set(ROLLOUT_ENGINES)


def test_trainer_names_no_backend_and_stays_short():
    source = (PACKAGE / "trainer.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 300
    tree = ast.parse(source)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & {"hf", "vllm", "megatron"}, "the trainer names a backend"
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "backend" not in attributes, "the trainer reads train.backend"
    getattr_targets = [ast.unparse(n.args[0]) for n in ast.walk(tree)
                       if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr"]  # fmt: skip
    assert all("engine" not in t for t in getattr_targets), "the trainer probes an engine with getattr"


def test_no_function_over_60_lines_in_the_package():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)
