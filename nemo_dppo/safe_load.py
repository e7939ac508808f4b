"""Loading files from checkpoints and model directories without running code that is stored in them.

- `.pt` files go through `torch.load(weights_only=True)`: only tensors, numbers, strings, lists, tuples and dicts
  unpickle; any other global (a `__reduce__` calling `os.system`, a numpy array) is refused before it is called.
- `.json` files are parsed as JSON, `.safetensors` headers are read by the safetensors library.

Every refusal is a `UserError` naming the file (one line), so the CLI prints `error: ...` and nothing has run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nemo_dppo.errors import UserError


def _one_line(err: BaseException) -> str:
    """The informative line of an exception (torch's weights-only error spans many lines)."""
    text = str(err)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_tensor_file(path: Path, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; anything else than plain tensor data is refused. `mmap`
    leaves the tensor data on disk (for checking a file without reading it all)."""
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as err:  # every failure: the same one-line refusal
        raise UserError(f"refusing to load {path}: not a plain tensor file ({_one_line(err)})") from None


def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line `UserError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"refusing to load {path}: not a JSON file ({_one_line(err)})") from None


def check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file (no tensor data, nothing executable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError and OS errors alike
        raise UserError(f"refusing to load {path}: not a safetensors file ({_one_line(err)})") from None


def check_files(directory: Path) -> None:
    """Every `.pt`, `.json` and `.safetensors` file under `directory` loads safely (else a `UserError` naming it)."""
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".pt":
            load_tensor_file(path, mmap=True)
        elif path.suffix == ".json":
            load_json(path)
        elif path.suffix == ".safetensors":
            check_safetensors(path)


def check_model_dir(model_dir: Path) -> None:
    """Check every JSON and safetensors file of an HF model directory before transformers reads it, so a damaged
    or planted file gives one line naming it instead of a traceback from deep inside a loader."""
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".json":
            load_json(path)
        elif path.suffix == ".safetensors":
            check_safetensors(path)
