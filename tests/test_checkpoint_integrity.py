"""Checkpoint integrity (issue #13, item 2): manifest, damaged checkpoints skipped, what `latest` may name."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_dppo.checkpoint import CheckpointManager, TrainerState, latest_intact, verify_checkpoint
from nemo_dppo.config import load_config
from nemo_dppo.errors import UserError
from nemo_dppo.run_logger import read_metrics
from tests.conftest import TINY_TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def _overrides(run_dir: Path, cache: Path) -> list[str]:
    return [*TINY_TEST_OVERRIDES, "steps=4", "save_every=2", "eval_every=2", f"run_dir={run_dir}",
            f"warm_start.cache_dir={cache}"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, warm_start_cache: Path) -> Path:
    """A finished tiny `hf` run with checkpoints at steps 2 and 4."""
    from nemo_dppo.trainer import train

    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    train(load_config(None, _overrides(run_dir, warm_start_cache)))
    return run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_publish_writes_a_manifest_of_every_file(trained: Path):
    checkpoint = trained / "checkpoints" / "step_000004"
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json", "COMPLETE"}
    assert {"train.pt", "trainer_state.json", "model/model.safetensors"} <= set(files)
    assert files["train.pt"]["size"] == (checkpoint / "train.pt").stat().st_size
    assert verify_checkpoint(checkpoint) is None


def test_truncated_latest_is_skipped_and_the_run_resumes_from_the_previous(run: Path, warm_start_cache: Path):
    """The issue's second finding: a truncated model.safetensors in the newest checkpoint stopped the run."""
    expected = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run)]
    weights = run / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_dppo.cli", "train", *_overrides(run, warm_start_cache), "resume=true"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "500"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = _warnings(proc.stderr)
    assert len(warnings) == 1 and "step_000004" in warnings[0] and "model/model.safetensors" in warnings[0]
    assert "resumed from" in proc.stderr and "(step 2)" in proc.stderr
    got = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run)]
    assert got == expected  # steps 3 and 4 re-run exactly


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda c: (c / "COMPLETE").unlink(), "no COMPLETE marker"),
        (lambda c: (c / "manifest.json").unlink(), "no readable manifest.json"),
        (lambda c: (c / "train.pt").unlink(), "train.pt is missing"),
        (lambda c: (c / "model" / "extra.bin").write_bytes(b"x"), "model/extra.bin is not in the manifest"),
        (lambda c: _flip_last_byte(c / "model" / "model.safetensors"), "model/model.safetensors does not match"),
        (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json has 2 bytes"),
    ],
    ids=["no-complete", "no-manifest", "missing-file", "extra-file", "same-size-flipped", "resized"],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(run: Path, capsys, damage, phrase):
    damage(run / "checkpoints" / "step_000004")
    assert CheckpointManager(run).latest() == run / "checkpoints" / "step_000002"
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "step_000004" in warnings[0] and phrase in warnings[0], warnings


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_no_intact_checkpoint_is_one_error_line(run: Path, capsys):
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / "COMPLETE").unlink()
    with pytest.raises(UserError, match="no intact checkpoint") as err:
        CheckpointManager(run).latest()
    assert "\n" not in str(err.value) and "step_000002" in str(err.value) and "step_000004" in str(err.value)
    assert len(_warnings(capsys.readouterr().err)) == 2
    empty = run.parent / "empty"
    assert CheckpointManager(empty).latest() is None  # nothing saved yet: a fresh start, not an error


@pytest.mark.parametrize("pointer", ["../outside", "/tmp", "step_000002/../../outside", "", "latest"])
def test_latest_must_name_a_step_directory_inside_checkpoints(run: Path, capsys, pointer: str):
    root = run / "checkpoints"
    outside = run / "outside"
    shutil.copytree(root / "step_000004", outside)  # intact, but not where a checkpoint may be
    (root / "latest").write_text(pointer)
    assert CheckpointManager(run).latest() == root / "step_000004"
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "ignoring" in warnings[0] and "latest" in warnings[0]


def test_symlinks_out_of_checkpoints_are_refused(run: Path, tmp_path: Path, capsys):
    root = run / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "step_000004", elsewhere)
    (root / "step_000009").symlink_to(elsewhere, target_is_directory=True)
    (root / "latest").write_text("step_000009")
    assert CheckpointManager(run).latest() == root / "step_000004"
    assert "step_000009: a symlink" in capsys.readouterr().err
    (root / "step_000009").unlink()
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "pointer")
    (tmp_path / "pointer").write_text("step_000002")
    assert CheckpointManager(run).latest() == root / "step_000004"  # a symlinked pointer is not followed
    (root / "step_000004" / "model" / "tokenizer.json").unlink()
    (root / "step_000004" / "model" / "tokenizer.json").symlink_to(root / "step_000002" / "model" / "tokenizer.json")
    assert latest_intact(root) == root / "step_000002"  # a symlinked file inside is damage too


def test_full_disk_removes_the_partial_checkpoint_and_keeps_latest(run: Path):
    manager = CheckpointManager(run, keep=2)

    class FullDisk(torch.nn.Module):
        def save_pretrained(self, path: Path, **_: object) -> None:
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(UserError) as err:
        manager.save(TrainerState(step=6), FullDisk(), None, optimizer, "")
    assert "disk is full" in str(err.value) and "latest is still step_000004" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step_000002", "step_000004"]


def test_an_interrupted_resave_is_put_back(run: Path):
    """A kill between moving the old copy of a re-saved step aside and renaming the new one into place."""
    root = run / "checkpoints"
    aside = root / ".tmp-old-x"
    aside.mkdir()
    os.rename(root / "step_000004", aside / "step_000004")
    (root / ".tmp-new").mkdir()
    manager = CheckpointManager(run)
    assert manager.latest() == root / "step_000004"
    assert not list(root.glob(".tmp-*"))
