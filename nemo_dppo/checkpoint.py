"""Atomic, verified checkpoints: RUN_DIR/checkpoints/step_NNNNNN/ = HF model dir + optimizer + RNG + trainer state.

    step_NNNNNN/model/            HF safetensors weights, config, tokenizer
    step_NNNNNN/train.pt          optimizer state, RNG states, grad scaler: tensors, numbers, strings, lists and
                                  dicts only, loaded with `torch.load(weights_only=True)` (nothing can execute)
    step_NNNNNN/trainer_state.json, config.yaml
    step_NNNNNN/manifest.json     every other file's relative path, size and sha256
    step_NNNNNN/COMPLETE          written last

A checkpoint is written into a temporary directory, fsync'd, then renamed into place; `latest` is a one-line file
replaced atomically afterwards. A crash at any point leaves the previous `latest` intact, and half-written
temporary directories are swept on the next start. On resume a checkpoint without `COMPLETE`, or whose files
do not match its manifest, is skipped with one warning line and the newest intact one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_dppo.errors import UserError
from nemo_dppo.safe_load import check_files, load_json, load_tensor_file

STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
MANIFEST_FILE = "manifest.json"
TRAIN_FILE = "train.pt"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"step_\d{6,}")
_CHUNK = 1 << 20


@dataclass
class TrainerState:
    step: int  # rollout steps completed
    best_eval_accuracy: float | None = None


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """torch / numpy / python RNG states as tensors and numbers (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    python_state = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                    "gauss_next": gauss_next}  # fmt: skip
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": python_state}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))  # fmt: skip
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


# ------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _covered_files(directory: Path) -> list[Path]:
    """Every path under `directory` the manifest covers (all but the manifest and the COMPLETE marker)."""
    skip = {directory / MANIFEST_FILE, directory / COMPLETE_MARKER}
    return sorted(p for p in directory.rglob("*") if p not in skip and (p.is_symlink() or not p.is_dir()))


def write_manifest(directory: Path) -> None:
    """`manifest.json`: relative path → size and sha256 of every file written so far."""
    files = {}
    for path in _covered_files(directory):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def verify_checkpoint(checkpoint: Path) -> str | None:
    """What is wrong with `checkpoint` (one phrase), or None when it is complete and matches its manifest."""
    if checkpoint.is_symlink() or not checkpoint.is_dir():
        return "not a directory" if not checkpoint.is_symlink() else "a symlink"
    if not (checkpoint / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} marker"
    try:
        listed = load_json(checkpoint / MANIFEST_FILE)["files"]
    except (UserError, KeyError, TypeError):
        return f"no readable {MANIFEST_FILE}"
    present = {p.relative_to(checkpoint).as_posix(): p for p in _covered_files(checkpoint)}
    for name, path in present.items():
        if path.is_symlink():
            return f"{name} is a symlink"
        if name not in listed:
            return f"{name} is not in the manifest"
    for name, entry in listed.items():
        path = present.get(name)
        if path is None:
            return f"{name} is missing"
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


# ---------------------------------------------------------------------------------------------- finding
def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _pointer_target(root: Path) -> Path | None:
    """The step directory `latest` names, when it is a `step_N` directory directly inside `root`."""
    pointer = root / LATEST_FILE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        name = pointer.read_text().strip() if pointer.is_file() and not pointer.is_symlink() else None
    except (OSError, UnicodeDecodeError):
        name = None
    if name is None or not STEP_DIR.fullmatch(name):
        _warn(f"ignoring {pointer}: it must be a file naming a step_NNNNNN directory inside {root}")
        return None
    if not (root / name).exists():
        _warn(f"{pointer} names {name}, which does not exist")
    return root / name


def latest_intact(root: Path) -> Path | None:
    """The checkpoint to resume from: what `latest` names when intact, else the newest intact `step_N`. Damaged
    ones are skipped with one warning line each; none intact (but some present) is a `UserError`."""
    target = _pointer_target(root)
    steps = sorted((p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name)), reverse=True)
    candidates = ([target] if target is not None else []) + [p for p in steps if p != target]
    problems = []
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        if candidate.exists() or candidate.is_symlink():
            problems.append(f"{candidate.name}: {problem}")
            _warn(f"skipping checkpoint {candidate}: {problem}")
    if problems:
        raise UserError(f"no intact checkpoint in {root} ({'; '.join(problems)})")
    return None


# ---------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a crash mid-write left; a step moved aside for a re-save goes back if never replaced."""
        for old in self.root.glob(".tmp-old-*"):
            for moved in old.glob("step_*"):
                if not (self.root / moved.name).exists():
                    os.rename(moved, self.root / moved.name)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def save(
        self,
        state: TrainerState,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        config_yaml: str,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write and publish the `hf` engine's checkpoint of `state.step`. A failed write (e.g. a full disk)
        removes the partial directory, keeps the previous `latest` and is a one-line `UserError`."""
        tmp = self.new_tmp_dir()
        try:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "model")
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), **(extra or {})}, tmp / TRAIN_FILE)
            return self.publish(tmp, state, config_yaml)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_write_error(self.root, state.step, err) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def new_tmp_dir(self) -> Path:
        """A fresh temporary directory under the checkpoint root (swept on the next start if never published)."""
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))

    def publish(self, tmp: Path, state: TrainerState, config_yaml: str) -> Path:
        """Finish a checkpoint written into `tmp`: trainer state, config, manifest and COMPLETE marker, fsync,
        rename into place, then replace `latest` and prune. Every engine's save ends here."""
        final = self.root / f"step_{state.step:06d}"
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp)
        (tmp / COMPLETE_MARKER).write_text("")
        _fsync_tree(tmp)
        self._move_into_place(tmp, final)
        _atomic_write(self.root / LATEST_FILE, final.name)
        self._prune()
        return final

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` to `final`; re-saving a step (e.g. right after a resume) swaps, then drops the old copy."""
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=self.root))
            os.replace(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)

    def latest(self) -> Path | None:
        """The newest intact checkpoint (see `latest_intact`), or None when there is none at all. Its files are
        then checked to load safely (every rank's shard included), else a `UserError` names the file: a file
        that matches its manifest but holds code was written that way and is refused, not skipped."""
        checkpoint = latest_intact(self.root)
        if checkpoint is not None:
            check_files(checkpoint)
        return checkpoint

    @staticmethod
    def load_state(checkpoint: Path) -> tuple[TrainerState, dict[str, Any]]:
        """Trainer state and the optimizer / RNG payload of `checkpoint` (the model is its `model/` dir); nothing
        in the files can execute (JSON, and `torch.load(weights_only=True)`)."""
        if not (checkpoint / COMPLETE_MARKER).is_file():
            raise UserError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE_MARKER} marker)")
        raw = load_json(checkpoint / STATE_FILE)
        try:
            state = TrainerState(**raw)
        except TypeError as err:
            raise UserError(f"refusing to load {checkpoint / STATE_FILE}: {err}") from None
        payload = load_tensor_file(checkpoint / TRAIN_FILE)
        if not isinstance(payload, dict) or "rng" not in payload:
            raise UserError(f"refusing to load {checkpoint / TRAIN_FILE}: no RNG state in it")
        return state, payload

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE_MARKER).is_file())
        for old in complete[: -self.keep]:
            self._remove_checkpoint(old)

    def _remove_checkpoint(self, checkpoint: Path) -> None:
        """Rename aside first (atomic), then delete: a crash mid-delete leaves only a `.tmp-*` to sweep."""
        doomed = Path(tempfile.mkdtemp(prefix=".tmp-prune-", dir=self.root))
        os.rename(checkpoint, doomed / checkpoint.name)
        shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_write_error(root: Path, step: int, err: OSError) -> UserError:
    """The one-line error of a checkpoint write that failed (the partial directory is already removed)."""
    reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    pointer = root / LATEST_FILE
    kept = pointer.read_text().strip() if pointer.is_file() else "none"
    return UserError(f"cannot write the checkpoint of step {step} in {root}: {reason} (the partial checkpoint "
                     f"was removed; latest is still {kept})")  # fmt: skip


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)
