"""Atomic checkpoints: RUN_DIR/checkpoints/step_NNNNNN/ = HF model dir + optimizer + RNG + trainer state.

A checkpoint is written into a temporary directory, fsync'd, then renamed into place; `latest` is a one-line file
replaced atomically afterwards. A crash at any point leaves the previous `latest` intact, and half-written
temporary directories are swept on the next start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_dppo.errors import UserError

STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"


@dataclass
class TrainerState:
    step: int  # rollout steps completed
    best_eval_accuracy: float | None = None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # left by a crash mid-write
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
        tmp = self.new_tmp_dir()
        try:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "model")
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), **(extra or {})}, tmp / "train.pt")
            return self.publish(tmp, state, config_yaml)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def new_tmp_dir(self) -> Path:
        """A fresh temporary directory under the checkpoint root (swept on the next start if never published)."""
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))

    def publish(self, tmp: Path, state: TrainerState, config_yaml: str) -> Path:
        """Finish a checkpoint written into `tmp`: trainer state, config and COMPLETE marker, fsync, rename into
        place, then replace `latest` and prune. Every engine's save ends here."""
        final = self.root / f"step_{state.step:06d}"
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / COMPLETE_MARKER).write_text("")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. right after a resume): swap, then drop the old copy
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=self.root))
            os.replace(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _atomic_write(self.root / "latest", final.name)
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / COMPLETE_MARKER).is_file():
                return candidate
        complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE_MARKER).is_file())
        return complete[-1] if complete else None

    @staticmethod
    def load_state(checkpoint: Path) -> tuple[TrainerState, dict[str, Any]]:
        """Trainer state and the optimizer / RNG payload of `checkpoint` (the model is its `model/` dir)."""
        if not (checkpoint / COMPLETE_MARKER).is_file():
            raise UserError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE_MARKER} marker)")
        state = TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))
        payload = torch.load(checkpoint / "train.pt", weights_only=False)
        return state, payload

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE_MARKER).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
