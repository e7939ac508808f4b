"""Faults injected from outside the trainer (issue #13, item 3): SIGKILL in every phase, a full disk mid-write.

Each run is a `nemo-dppo train` subprocess started with a `sitecustomize.py` (written into tmp_path, put first
on PYTHONPATH, so the launched Megatron ranks load it too) that wraps one phase function named in `PHASES` and
kills its own process at a chosen call. Nothing in the trainer or the engines knows about it. If a refactor
renames a phase function, change its line in `PHASES`.

One test per engine walks a chain: a run is killed in one phase, the next run resumes (`resume=true`) and is
killed in the next phase, ..., and a last run finishes. After every kill the metrics written so far must be a
prefix of the uninterrupted run's (non-time keys), and every resume must start at or after the last checkpoint
published before the kill. The phase order and the kill moments (step, call) come from a seeded RNG; the seed is
in the test id.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nemo_dppo.run_logger import read_metrics
from tests.conftest import TINY_TEST_OVERRIDES

#: phase → (hf target, Megatron target, Megatron rank killed, kill "before" or "after" the call, calls per step).
#: Targets are "module:attribute.path", looked up by name in the run's processes.
PHASES: dict[str, tuple[str, str, int, str, int]] = {
    "rollout": ("nemo_dppo.engines.hf_rollout:HFRolloutEngine.generate",
                "nemo_dppo.engines.hf_rollout:HFRolloutEngine.generate", 0, "before", 1),
    "pi_old": ("nemo_dppo.engines.hf_training:HFTrainingEngine.compute_logprobs",
               "nemo_dppo.engines.megatron_training:MegatronTrainingEngine.compute_logprobs", 1, "before", 1),
    "update": ("nemo_dppo.engines.hf_training:HFTrainingEngine.train_step",
               "nemo_dppo.engines.megatron_training:MegatronTrainingEngine.train_step", 1, "before", 2),
    "weight_sync": ("nemo_dppo.engines.hf_rollout:HFRolloutEngine.sync_weights",
                    "nemo_dppo.engines.megatron_training:MegatronTrainingEngine.hf_state_dict", 1, "before", 1),
    "evaluation": ("nemo_dppo.trainer:Trainer.evaluate", "nemo_dppo.trainer:Trainer.evaluate", 0, "before", 1),
    "ckpt_before_rename": ("nemo_dppo.checkpoint:CheckpointManager._move_into_place",
                           "nemo_dppo.checkpoint:CheckpointManager._move_into_place", 0, "before", 1),
    "ckpt_after_rename": ("nemo_dppo.checkpoint:CheckpointManager._move_into_place",
                          "nemo_dppo.checkpoint:CheckpointManager._move_into_place", 0, "after", 1),
    "prune": ("nemo_dppo.checkpoint:CheckpointManager._remove_checkpoint",
              "nemo_dppo.checkpoint:CheckpointManager._remove_checkpoint", 0, "before", 1),
}  # fmt: skip
#: Observed, never changed: the step being run (faults count calls from a chosen step on) and published steps.
STEP_PROBE = "nemo_dppo.trainer:Trainer.train_one_step"
PUBLISH_PROBE = "nemo_dppo.checkpoint:CheckpointManager.publish"
#: A full disk: the call raises OSError(ENOSPC) instead (hf: the fsync before the rename; Megatron: a rank's shard).
ENOSPC = {
    "hf": ("nemo_dppo.checkpoint:_fsync_tree", ""),
    "megatron": ("nemo_dppo.megatron.checkpoint_io:_write_shard", "1"),
}

ENGINES = {
    "hf": ["steps=20", "save_every=2", "eval_every=3", "keep_checkpoints=1"],
    "megatron": ["train.backend=megatron", "train.megatron.ep=2", "steps=20", "save_every=2", "eval_every=3",
                 "keep_checkpoints=1"],
}  # fmt: skip
SEEDS = {"hf": 1309, "megatron": 2718}
#: Seconds the surviving Megatron ranks get after one was killed before the test kills the launcher.
TEARDOWN_S = 3.0
#: Printed once per warm-start cache (the first run of a session); not part of the outcome.
WARM_START_NOTE = "preparing the warm-started"

SITECUSTOMIZE = r"""
import importlib.abc, json, os, signal, sys

_PENDING = {}  # module name -> callbacks to run on the module right after it is first imported


class _AfterImport(importlib.abc.MetaPathFinder):
    # Patches a module when the program imports it (importing it here would change the import order).

    def find_spec(self, name, path, target=None):
        if name not in _PENDING:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        callbacks, run = _PENDING.pop(name), spec.loader.exec_module

        def exec_module(module):
            run(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module
        return spec


def _wrap(target, make):
    module_name, attr = target.split(":")

    def apply(module):
        owner = module
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, make(getattr(owner, name)))

    if module_name in sys.modules:
        apply(sys.modules[module_name])
    else:
        _PENDING.setdefault(module_name, []).append(apply)


def _install():
    env = os.environ
    rank = env.get("RANK", "")  # "" in an hf run (one process)
    if env["FAULT_RANK"] and not rank:
        return  # the Megatron launcher: nothing of the trainer runs in it
    log = env["FAULT_LOG"]
    state = {"step": 0, "calls": 0}

    def record(event):
        with open(log, "a") as f:
            f.write(json.dumps({**event, "rank": rank, "pid": os.getpid()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def step_probe(fn):
        def wrapper(self, step, *a, **k):
            state["step"] = step
            return fn(self, step, *a, **k)
        return wrapper

    def publish_probe(fn):
        def wrapper(self, tmp, train_state, *a, **k):
            out = fn(self, tmp, train_state, *a, **k)
            record({"published": train_state.step})
            return out
        return wrapper

    _wrap(env["FAULT_STEP_PROBE"], step_probe)
    _wrap(env["FAULT_PUBLISH_PROBE"], publish_probe)
    if rank != env["FAULT_RANK"]:
        return
    when, min_step, call = env["FAULT_WHEN"], int(env["FAULT_MIN_STEP"]), int(env["FAULT_CALL"])

    def fire():
        record({"fault": env["FAULT_PHASE"], "step": state["step"], "call": call, "kind": when})
        if when == "enospc":
            raise OSError(28, "No space left on device")
        os.kill(os.getpid(), signal.SIGKILL)

    def fault(fn):
        def wrapper(*a, **k):
            armed = state["step"] >= min_step
            if armed:
                state["calls"] += 1
            hit = armed and state["calls"] == call
            if hit and when in ("before", "enospc"):
                fire()
            out = fn(*a, **k)
            if hit and when == "after":
                fire()
            return out
        return wrapper

    _wrap(env["FAULT_TARGET"], fault)

if os.environ.get("FAULT_PHASE"):
    sys.meta_path.insert(0, _AfterImport())
    _install()
"""


def _no_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def _args(engine: str, run_dir: Path, cache: Path) -> list[str]:
    # `always`: the π_old phase exists (under `auto` the default mode skips it, and its kill would never fire)
    return [*TINY_TEST_OVERRIDES, *ENGINES[engine], "train.recompute_old_logprobs=always",
            f"warm_start.cache_dir={cache}", f"run_dir={run_dir}"]  # fmt: skip


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One `nemo-dppo train` run. Once a Megatron rank has killed itself, the survivors get `TEARDOWN_S` seconds,
    then the launcher is killed (its ranks die with it) instead of waiting out its failure and terminate graces."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "500", **(env or {})}
    log = Path(full_env["FAULT_LOG"]) if "FAULT_LOG" in full_env else None
    before = len(_events(log)) if log else 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nemo_dppo.cli", "train", *args], env=full_env,
                                stdout=out, stderr=err, text=True)  # fmt: skip
        fired_at, deadline = None, time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if fired_at is None and log and any(e.get("kind") in ("before", "after") for e in _events(log)[before:]):
                fired_at = time.monotonic()
            if fired_at is not None and time.monotonic() - fired_at > TEARDOWN_S:
                proc.kill()
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    _wait_ranks_gone(args)
    return result


def _wait_ranks_gone(args: list[str]) -> None:
    """The Megatron ranks die with their launcher (PDEATHSIG); wait until they have."""
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", f"nemo_dppo.launch train {run_dir}"], capture_output=True, text=True)
        if not out.stdout.split():
            return
        time.sleep(0.1)
    raise AssertionError(f"ranks of {run_dir} still running")


def _fault_env(tmp_path: Path, engine: str, phase: str, min_step: int, call: int, log: Path) -> dict[str, str]:
    site = tmp_path / "fault_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    if phase == "enospc":
        target, rank = ENOSPC[engine]
        when = "enospc"
    else:
        hf_target, megatron_target, megatron_rank, when, _ = PHASES[phase]
        target, rank = (hf_target, "") if engine == "hf" else (megatron_target, str(megatron_rank))
    repo = str(Path(__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([str(site), repo, os.environ.get("PYTHONPATH", "")]),
            "FAULT_PHASE": phase, "FAULT_TARGET": target, "FAULT_RANK": rank, "FAULT_WHEN": when,
            "FAULT_MIN_STEP": str(min_step), "FAULT_CALL": str(call), "FAULT_LOG": str(log),
            "FAULT_STEP_PROBE": STEP_PROBE, "FAULT_PUBLISH_PROBE": PUBLISH_PROBE}  # fmt: skip


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, warm_start_cache: Path) -> Callable[[str], list[dict]]:
    """The uninterrupted run of each engine (computed on first use)."""
    cache: dict[str, list[dict]] = {}
    root = tmp_path_factory.mktemp("fault_reference")

    def get(engine: str) -> list[dict]:
        if engine not in cache:
            run_dir = root / engine
            proc = _run(_args(engine, run_dir, warm_start_cache))
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[engine] = [_no_times(r) for r in read_metrics(run_dir)]
        return cache[engine]

    return get


def _resumed_step(stderr: str) -> int:
    found = re.findall(r"resumed from \S+ \(step (\d+)\)", stderr)
    return int(found[-1]) if found else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine,seed", [(e, s) for e, s in SEEDS.items()], ids=[f"{e}-seed{s}" for e, s in SEEDS.items()]
)
def test_sigkill_in_every_phase_then_resume(engine, seed, references, warm_start_cache, tmp_path):
    if engine == "megatron":
        pytest.importorskip("megatron.core")
    expected = references(engine)
    total_steps = expected[-1]["step"]
    rng = random.Random(seed)
    order = list(PHASES)
    rng.shuffle(order)
    run_dir, log = tmp_path / "run", tmp_path / "faults.jsonl"
    args = [*_args(engine, run_dir, warm_start_cache), "resume=true"]
    resumed_at, rows = 0, []
    for phase in order:
        min_step = resumed_at + rng.randint(1, 2) + (2 if resumed_at == 0 else 0)  # the first kill: after a save
        call = rng.randint(1, PHASES[phase][4])
        published_before = [e["published"] for e in _events(log) if "published" in e]
        proc = _run(args, _fault_env(tmp_path, engine, phase, min_step, call, log))
        fired = [e for e in _events(log) if e.get("fault") == phase]
        assert proc.returncode != 0 and len(fired) == 1, (
            f"{phase}: no fault fired ({proc.returncode})\n{proc.stderr[-2000:]}"
        )
        assert _resumed_step(proc.stderr) == resumed_at, proc.stderr[-2000:]  # this run resumed where expected
        got = [_no_times(r) for r in read_metrics(run_dir)]
        assert got == expected[: len(got)], f"{phase}: metrics differ from the uninterrupted run"
        published = [e["published"] for e in _events(log) if "published" in e]
        last_published = max(published, default=0)
        new_start = _peek_resume_step(run_dir)
        assert last_published <= new_start <= fired[0]["step"], (phase, published_before, published, new_start)
        rows.append((phase, fired[0]["step"], call, resumed_at, new_start))
        resumed_at = new_start
        assert resumed_at < total_steps, f"the chain ran out of steps at {phase}"
    final = _run(args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _resumed_step(final.stderr) == resumed_at
    got = [_no_times(r) for r in read_metrics(run_dir)]
    assert [r["step"] for r in got] == list(range(total_steps + 1))
    assert got == expected
    print(f"\n{engine} seed {seed}: (phase, killed at step, call, run resumed from, next resume from)")
    for row in rows:
        print("  ", row)


def _peek_resume_step(run_dir: Path) -> int:
    """The step the next resume starts from, as the trainer would find it (read-only)."""
    from nemo_dppo.checkpoint import latest_intact

    root = run_dir / "checkpoints"
    checkpoint = latest_intact(root) if root.is_dir() else None
    return 0 if checkpoint is None else json.loads((checkpoint / "trainer_state.json").read_text())["step"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_full_disk_while_writing_keeps_the_previous_checkpoint(engine, warm_start_cache, tmp_path):
    if engine == "megatron":
        pytest.importorskip("megatron.core")
    run_dir, log = tmp_path / "run", tmp_path / "faults.jsonl"
    args = [*_args(engine, run_dir, warm_start_cache), "steps=4"]
    proc = _run(args, _fault_env(tmp_path, engine, "enospc", 3, 1, log))  # the write of step 4's checkpoint
    assert [e["step"] for e in _events(log) if e.get("fault")] == [4]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if engine == "hf":  # the Megatron ranks print megatron-core's own notes (fusions unavailable on CPU) too
        assert [line for line in lines if not line.startswith(WARM_START_NOTE)] == errors, proc.stderr[-3000:]
    assert "step 4" in errors[0] and "disk is full" in errors[0] and "latest is still step_000002" in errors[0]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]  # the partial one is gone
    assert not list(root.glob(".tmp-*"))
