"""Nothing stored in a checkpoint or model directory runs when it is loaded (issue #13, items 1 and 4).

A pickle whose `__reduce__` calls `os.system("touch MARKER")` is planted in every file the loaders read; the load
is refused with one line naming the file and MARKER is never created. The planted file is also entered into the
manifest (an attacker who can write the file can rewrite the manifest), so the refusal is the loader's, not the
integrity check's.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_dppo.checkpoint import CheckpointManager, rng_state, set_rng_state
from nemo_dppo.config import load_config
from nemo_dppo.errors import UserError
from tests.conftest import TINY_TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
#: Files of an `hf` checkpoint that a resume reads (config.yaml is a record only, never read back).
HF_READ_FILES = ["train.pt", "trainer_state.json", "manifest.json", "model/model.safetensors", "model/config.json",
                 "model/generation_config.json", "model/tokenizer.json", "model/tokenizer_config.json"]  # fmt: skip
MEGATRON_READ_FILES = ["megatron/rank_00000.pt", "megatron/rank_00001.pt", "megatron/layout.json"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` by the malicious pickle; enter it into the checkpoint's manifest when there is one."""
    path.write_bytes(pickle.dumps({"optimizer": _Exploit(marker), "rng": _Exploit(marker)}))
    checkpoint = next(p for p in path.parents if re.fullmatch(r"step_\d+", p.name))
    manifest = checkpoint / "manifest.json"
    if manifest.is_file() and path != manifest:
        data = json.loads(manifest.read_text())
        data["files"][path.relative_to(checkpoint).as_posix()] = {
            "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
        manifest.write_text(json.dumps(data))


def _overrides(run_dir: Path, cache: Path) -> list[str]:
    return [*TINY_TEST_OVERRIDES, "steps=2", "save_every=2", "eval_every=2", f"run_dir={run_dir}",
            f"warm_start.cache_dir={cache}"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, warm_start_cache: Path) -> Path:
    """A finished tiny `hf` run with one checkpoint (step 2); tests work on copies of it."""
    from nemo_dppo.trainer import train

    run_dir = tmp_path_factory.mktemp("secure") / "run"
    train(load_config(None, _overrides(run_dir, warm_start_cache)))
    return run_dir


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_resume_refuses_a_malicious_train_pt_with_one_line(run_copy: Path, warm_start_cache: Path, tmp_path: Path):
    """The issue's reproduction, through the CLI: before the fix this created MARKER (then a KeyError traceback)."""
    marker = tmp_path / "MARKER"
    plant(run_copy / "checkpoints" / "step_000002" / "train.pt", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_dppo.cli", "train", *_overrides(run_copy, warm_start_cache), "resume=true"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert not marker.exists(), "code stored in train.pt ran on resume"
    assert proc.returncode == 2, proc.stderr
    assert "step_000002/train.pt" in _one_error_line(proc.stderr)


@pytest.mark.parametrize("name", HF_READ_FILES)
def test_every_file_a_resume_reads_is_refused(run_copy: Path, warm_start_cache: Path, tmp_path: Path, name: str):
    from nemo_dppo.trainer import Trainer

    marker = tmp_path / "MARKER"
    plant(run_copy / "checkpoints" / "step_000002" / name, marker)
    with pytest.raises(UserError) as err:
        Trainer(load_config(None, [*_overrides(run_copy, warm_start_cache), "resume=true"]))
    assert not marker.exists()
    assert name in str(err.value) and "\n" not in str(err.value)


def test_the_loaders_themselves_refuse(run_copy: Path, tmp_path: Path):
    """Below the pre-check: `load_state` and the Megatron `load_shard` never unpickle code either."""
    from nemo_dppo.megatron import checkpoint_io

    checkpoint = run_copy / "checkpoints" / "step_000002"
    marker = tmp_path / "MARKER"
    plant(checkpoint / "train.pt", marker)
    with pytest.raises(UserError, match=r"refusing to load .*train\.pt: not a plain tensor file"):
        CheckpointManager.load_state(checkpoint)
    shard = checkpoint_io.shard_file(checkpoint, 0)
    shard.parent.mkdir()
    (checkpoint / "megatron" / "layout.json").write_text(json.dumps({"ep": 2}))
    plant(shard, marker)

    class Engine:
        def layout_description(self) -> dict:
            return {"ep": 2}

        def load_shard_state(self, state: dict) -> None:
            raise AssertionError("a malicious shard reached the engine")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint_io.dist, "get_rank", lambda: 0)
        with pytest.raises(UserError, match=r"rank_00000\.pt: not a plain tensor file"):
            checkpoint_io.load_shard(checkpoint, Engine())
    assert not marker.exists()


@pytest.mark.parametrize("name", MEGATRON_READ_FILES)
def test_megatron_shards_are_checked_on_the_main_rank(run_copy: Path, tmp_path: Path, name: str):
    """The main rank checks every rank's shard before any rank loads one, so the error names the file."""
    from nemo_dppo.checkpoint import write_manifest

    checkpoint = run_copy / "checkpoints" / "step_000002"
    (checkpoint / "megatron").mkdir()
    for rank in range(2):
        torch.save({"model": {"w": torch.ones(2)}, "rng": torch.get_rng_state()}, checkpoint / "megatron" /
                   f"rank_{rank:05d}.pt")  # fmt: skip
    (checkpoint / "megatron" / "layout.json").write_text(json.dumps({"ep": 2}))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    assert CheckpointManager(run_copy).latest() == checkpoint  # intact and safe as written
    marker = tmp_path / "MARKER"
    plant(checkpoint / name, marker)
    with pytest.raises(UserError, match=re.escape(name)):
        CheckpointManager(run_copy).latest()
    assert not marker.exists()


def test_eval_refuses_planted_model_files(run_copy: Path, tmp_path: Path):
    from nemo_dppo.data import MathRecord, write_records
    from nemo_dppo.evaluate import run_eval

    data = write_records([MathRecord("1+1=", "2", "toy", "toy/0", "1+1=")], tmp_path / "toy.jsonl")
    marker = tmp_path / "MARKER"
    for name in ("model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        run = tmp_path / name.replace("/", "_")
        shutil.copytree(run_copy, run)
        plant(run / "checkpoints" / "step_000002" / name, marker)
        with pytest.raises(UserError, match=re.escape(name)):
            run_eval(run, data, k=1, max_new_tokens=2, write=False, progress=False)
    assert not marker.exists()


def test_checkpoint_tensor_files_hold_no_pickled_objects(trained: Path):
    """Every `.pt` of a real checkpoint loads with `weights_only=True`, and its RNG state restores all three RNGs."""
    checkpoint = trained / "checkpoints" / "step_000002"
    payload = torch.load(checkpoint / "train.pt", weights_only=True)
    assert set(payload) >= {"optimizer", "rng"} and payload["optimizer"]["state"]
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(torch.load(_roundtrip(saved, checkpoint.parent / "rng.pt"), weights_only=True))
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    np.random.randn()  # leaves a cached gaussian: that part of numpy's state must survive too
    saved = rng_state()
    expected_gauss = np.random.randn(2)
    set_rng_state(torch.load(_roundtrip(saved, checkpoint.parent / "rng2.pt"), weights_only=True))
    assert np.array_equal(np.random.randn(2), expected_gauss)


def _roundtrip(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------------------- trust_remote_code
def _from_pretrained_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted((REPO / "nemo_dppo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return calls


def test_no_trust_remote_code_anywhere():
    """No loader passes `trust_remote_code=True` (or hides it in **kwargs); configs do not set it either."""
    calls = _from_pretrained_calls()
    assert len(calls) >= 4  # tokenizer + model in the project loader and the eval Auto* path
    for where, call in calls:
        for keyword in call.keywords:
            assert keyword.arg is not None, f"{where}: **kwargs could carry trust_remote_code"
            if keyword.arg == "trust_remote_code":
                assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, where
    pattern = re.compile(r"trust_remote_code\s*[:=]\s*(True|true|1)")
    for path in [*(REPO / "nemo_dppo").rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), *(REPO / "tools").rglob("*")]:
        if path.is_file() and path.suffix in {".py", ".yaml", ".sh", ".sbatch"}:
            assert not pattern.search(path.read_text()), path


def test_auto_map_code_in_a_model_dir_never_runs(trained: Path, tmp_path: Path):
    """A model directory whose config and tokenizer config point (`auto_map`) at a local module that creates
    MARKER on import: the project loader and the eval Auto* path load or refuse it without importing it."""
    from nemo_dppo.evaluate import EvalSettings, hf_engine_factory
    from nemo_dppo.models.tiny_moe import load_model_dir

    model_dir = tmp_path / "remote_code_model"
    shutil.copytree(trained / "checkpoints" / "step_000002" / "model", model_dir)
    marker = tmp_path / "MARKER"
    (model_dir / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Qwen3MoeConfig as EvilConfig, Qwen3MoeForCausalLM as EvilModel\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    load_model_dir(str(model_dir))  # a Qwen3-MoE dir: built from the project's classes, auto_map ignored
    config.update(model_type="remote_only", architectures=["EvilModel"])  # only the remote code could build it
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="custom code"):
        hf_engine_factory(model_dir, EvalSettings(dtype="fp32"))
    assert not marker.exists()
