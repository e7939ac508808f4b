"""`python -m nemo_dppo.nemo_rl.run`: every failure to import or set up NeMo-RL is one `error:` line, exit 2.

Each case puts a small fake `nemo_rl` package first on the path of a subprocess, failing the way real installs were
seen to fail (a pydantic model that needs Python ≥ 3.12, a missing dependency, a version without an API, a setup
step raising).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "conf" / "nemo_rl" / "qwen3_30b_a3b_base.yaml"

TYPED_DICT = (
    "raise TypeError('Please use `typing_extensions.TypedDict` instead of `typing.TypedDict` on Python < 3.12.')\n"
)
SETUP_OK = "def setup(*a, **k):\n    return ()\ndef grpo_train(*a, **k):\n    pass\n"
CASES = {
    "wrong_python": ({"algorithms/grpo.py": TYPED_DICT}, "NeMo-RL needs Python ≥ 3.12"),
    "missing_dependency": (
        {"algorithms/grpo.py": "import nemo_dppo_test_absent_dependency\n"},
        "its dependency 'nemo_dppo_test_absent_dependency' is missing",
    ),
    "missing_api": (
        {"algorithms/grpo.py": "def setup(*a, **k):\n    return ()\n"},
        "needs NeMo-RL 0.6–0.7 or main: nemo_rl.algorithms.grpo.grpo_train does not exist",
    ),
    "missing_module": (
        {"algorithms/grpo.py": SETUP_OK},
        "the installed NeMo-RL has no module nemo_rl.utils",
    ),
    "setup_raises": (
        {
            "algorithms/grpo.py": SETUP_OK,
            "utils/config.py": "def load_config(path):\n    raise RuntimeError('no GPU found by the cluster')\n",
        },
        "NeMo-RL's GRPO setup failed: RuntimeError: no GPU found by the cluster",
    ),
}


def _fake_nemo_rl(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / "nemo_rl" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in [root / "nemo_rl", *(root / "nemo_rl").rglob("*")]:
        if directory.is_dir() and not (directory / "__init__.py").exists():
            (directory / "__init__.py").write_text("")


@pytest.mark.parametrize("case", sorted(CASES))
def test_nemo_rl_failures_are_one_error_line(case: str, tmp_path: Path) -> None:
    files, expected = CASES[case]
    if case == "wrong_python" and sys.version_info >= (3, 12):
        expected = "importing nemo_rl.algorithms.grpo failed: TypeError: Please use `typing_extensions.TypedDict`"
    _fake_nemo_rl(tmp_path, files)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    env.pop("NEMO_DPPO_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dppo.nemo_rl.run", str(RECIPE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
