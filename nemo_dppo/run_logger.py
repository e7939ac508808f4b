"""`RunLogger`: per-step metrics to `RUN_DIR/metrics.jsonl` (crash-safe) and TensorBoard scalars.

    with RunLogger(cfg.run_dir, resume_from_step=ckpt_step) as logger:
        logger.log(step, {"reward/mean": -0.25, "loss/mask_frac": 0.02})

- Each `log` appends one JSON line and fsyncs it, so a SIGKILL loses at most the line being written.
- Opening the logger repairs the file first: a trailing partial line (a kill mid-write) is dropped, and on resume
  from step s every line with step > s is dropped too (the run logged past its last checkpoint). The repaired
  file replaces the old one atomically (temp file + `os.replace`).
- Non-finite values are written as `null` (strict JSON) and skipped in TensorBoard. On resume the TensorBoard
  writer purges its own events after step s (`SummaryWriter(purge_step=s + 1)`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The complete records of a metrics file and whether the file is clean (nothing partial, ends in a newline).

    A line is complete when it parses as a JSON object (NaN/Infinity tokens from other writers become None).
    Only the last line may be partial; a malformed line anywhere else is corruption: a one-line `ValueError`.
    """
    text = path.read_bytes().decode("utf-8", errors="replace")  # a kill can cut a multi-byte character
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    clean = not text or text.endswith("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=lambda _: None)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if number == len(lines):
                clean = False
                break
            raise ValueError(f"{path}:{number}: malformed metrics line ({err})") from None
        records.append(record)
    return records, clean


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of `RUN_DIR/metrics.jsonl`, in file order (null values come back as None)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    return _parse_lines(path)[0]


def _json_value(key: str, value: Any) -> float | None:
    """A metric value as a finite float, or None for NaN/inf/None (so the JSON stays strict)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from None
    return number if math.isfinite(number) else None


def _write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace `path` with `records`, one JSON line each, via a fsync'd temp file and `os.replace`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class RunLogger:
    """Appends one metrics record per step to `RUN_DIR/metrics.jsonl` and to TensorBoard (context manager).

    `resume_from_step=None` appends to whatever is there; `s` keeps only steps ≤ s; `-1` starts over (a fresh run
    in a used run dir: every old line and TensorBoard event is dropped).
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], tensorboard: bool = True, resume_from_step: int | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._repair(resume_from_step)
        self._writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: torch is heavy

            purge_step = None if resume_from_step is None else resume_from_step + 1
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run

    def _repair(self, resume_from_step: int | None) -> None:
        """Drop a trailing partial line and, on resume, the lines logged after `resume_from_step`."""
        if not self.path.is_file():
            return
        records, clean = _parse_lines(self.path)
        kept = records
        if resume_from_step is not None:
            kept = [r for r in records if r.get("step") is None or r["step"] <= resume_from_step]
        if not clean or len(kept) != len(records):
            _write_atomically(self.path, kept)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append `{"step": step, **metrics}` as one fsync'd JSON line and write the finite values to TensorBoard."""
        if self._file.closed:
            raise RuntimeError(f"RunLogger for {self.run_dir} is closed")
        if "step" in metrics and metrics["step"] != step:
            raise ValueError(f"metrics['step']={metrics['step']} disagrees with step={step}")
        record: dict[str, Any] = {"step": int(step)}
        record.update({key: _json_value(key, value) for key, value in metrics.items() if key != "step"})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self._writer.add_scalar(key, value, global_step=int(step))
            self._writer.flush()

    def close(self) -> None:
        """Close the metrics file and the TensorBoard writer (idempotent)."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
