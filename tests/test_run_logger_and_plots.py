"""RunLogger (JSONL + TensorBoard, resume, crash tolerance) and the plots / report built from its output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from nemo_dppo.plots import load_run, plot_run, plot_runs, write_report
from nemo_dppo.run_logger import METRICS_FILE, RunLogger, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def _fake_metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    metrics = {
        "reward/mean": -0.5 + 0.05 * step + offset,
        "reward/accuracy": 0.25 + 0.025 * step,
        "response/length_mean": 5.0,
        "loss/loss": -0.01,
        "loss/mask_frac": 0.02 + 0.001 * step,
        "loss/mask_frac_pos": 0.01,
        "loss/mask_frac_neg": 0.03,
        "mismatch/kl_k3": 1e-4 * (step + 1),
        "mismatch/abs_prob_diff_mean": 0.01,
        "routing/disagreement": 0.03,
        "time/rollout": 1.0,
        "time/logprob": 0.25,
        "time/train": 2.0,
        "time/sync": 0.25,
        "time/step": 3.5,
    }
    if step % 4 == 0:
        metrics["eval/accuracy"] = 0.3 + 0.1 * step / 4
    return metrics


def _fake_run(run_dir: Path, mode: str, steps: int = 10, offset: float = 0.0) -> Path:
    with RunLogger(run_dir, tensorboard=False) as logger:
        for step in range(steps):
            logger.log(step, _fake_metrics(step, offset))
    (run_dir / "config.yaml").write_text(
        f"run_dir: {run_dir}\nsteps: {steps}\nloss:\n  mode: {mode}\n  clip_low: 0.2\n  delta_low: null\n"
        "rollout:\n  n: 8\n  temperature: 1.0\ntrain:\n  lr: 1.0e-06\n",
        encoding="utf-8",
    )
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return _fake_run(root / "dppo", "dppo_binary_tv"), _fake_run(root / "grpo", "ppo_clip", offset=-0.1)


# --------------------------------------------------------------------------------------------------- logger


def test_round_trip(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"reward/mean": -0.25, "loss/mask_frac": np.float32(0.5)})
        logger.log(1, {"reward/mean": 0.125, "time/step": 3})
        logger.log(2, {"eval/accuracy": 0.41})
    assert read_metrics(tmp_path) == [
        {"step": 0, "reward/mean": -0.25, "loss/mask_frac": 0.5},
        {"step": 1, "reward/mean": 0.125, "time/step": 3.0},
        {"step": 2, "eval/accuracy": 0.41},
    ]


def test_non_finite_values_are_null(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5})
    text = (tmp_path / METRICS_FILE).read_text()

    def reject(token: str) -> Any:
        raise AssertionError(f"non-JSON token {token}")

    assert json.loads(text, parse_constant=reject) == {"step": 0, "a": None, "b": None, "c": None, "d": 1.5}


def test_resume_truncates_steps_after_the_checkpoint(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for step in range(5):
            logger.log(step, {"x": step})
    with RunLogger(tmp_path, tensorboard=False, resume_from_step=2) as logger:
        assert _steps(tmp_path) == [0, 1, 2]
        logger.log(3, {"x": 30.0})
    assert _steps(tmp_path) == [0, 1, 2, 3] and read_metrics(tmp_path)[-1]["x"] == 30.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temp file left behind


def test_partial_trailing_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x": 2.0}\n{"step": 2, "x": 3.')
    assert _steps(tmp_path) == [0, 1]
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"x": 3.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_complete_but_unterminated_last_line_is_kept(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x": 2.0}')
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"x": 3.0})
    assert _steps(tmp_path) == [0, 1, 2]


def test_malformed_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 0}\n{"step": 1, \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed"):
        read_metrics(tmp_path)


def test_sigkill_loses_nothing_already_logged(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from nemo_dppo.run_logger import RunLogger
        logger = RunLogger({str(tmp_path)!r}, tensorboard=False)
        for step in range(3):
            logger.log(step, {{"x": step}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()
    assert _steps(tmp_path) == [0, 1, 2]


def test_tensorboard_scalars_and_resume_purge(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as logger:
        for step in range(5):
            logger.log(step, {"reward/mean": step / 4, "loss/ratio_max": math.nan})
    with RunLogger(tmp_path, resume_from_step=2) as logger:
        logger.log(3, {"reward/mean": -1.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert "reward/mean" in accumulator.Tags()["scalars"]
    assert "loss/ratio_max" not in accumulator.Tags()["scalars"]  # non-finite values are not written
    events = accumulator.Scalars("reward/mean")
    assert [e.step for e in events] == [0, 1, 2, 3]  # steps 3, 4 of the first session were purged
    assert [e.value for e in events] == pytest.approx([0.0, 0.25, 0.5, -1.0])


# --------------------------------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_run_writes_pngs(two_runs: tuple[Path, Path]) -> None:
    run_dir = two_runs[0]
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["reward.png", "mismatch.png", "mask.png", "time.png"]
    for path in paths:
        assert path.parent == run_dir / "plots"
        _assert_png(path)
    image = matplotlib.image.imread(paths[0])
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100 and image.shape[1] > 100


def test_missing_keys_skip_curves_and_figures(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for step in range(4):
            logger.log(step, {"reward/mean": step / 4, "mismatch/kl_k3": 0.0 if step == 0 else 1e-3})
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "mismatch.png"]  # no mask or time metrics at all
    for path in paths:
        _assert_png(path)


def test_plot_runs_overlays_two_runs(two_runs: tuple[Path, Path]) -> None:
    assert [load_run(d).label for d in two_runs] == ["dppo_binary_tv (dppo)", "ppo_clip (grpo)"]
    paths = plot_runs(list(two_runs))
    assert {p.name for p in paths} == {"reward.png", "mismatch.png", "mask.png", "time.png"}
    for path in paths:
        assert path.parent == two_runs[0] / "plots" / "compare"
        _assert_png(path)


def test_report_contents(two_runs: tuple[Path, Path]) -> None:
    run_dir = two_runs[0]
    rewards = [_fake_metrics(step)["reward/mean"] for step in range(10)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    report = write_report(run_dir)
    assert report == run_dir / "report.md"
    text = report.read_text()
    assert f"{first:.4g} → {last:.4g}" in text
    assert "dppo_binary_tv" in text and "| train.lr | 1e-06 |" in text and "| rollout.n | 8 |" in text
    assert "| eval/accuracy, best | 0.5 (step 8) |" in text and "| eval/accuracy, last | 0.5 (step 8) |" in text
    assert "| loss/mask_frac, mean | 0.0245 |" in text
    assert "| time, total | 35.0 s (3.50 s/step) |" in text and "| time/train, total | 20.0 s, 57% |" in text
    assert "loss.delta_low" not in text  # null config values are left out
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert links == ["plots/reward.png", "plots/mismatch.png", "plots/mask.png", "plots/time.png"]
    assert all((run_dir / link).is_file() for link in links)


def test_errors_on_missing_or_empty_runs(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no metrics.jsonl in"):
        write_report(tmp_path)
    (tmp_path / METRICS_FILE).write_text("")
    with pytest.raises(ValueError, match="has no metrics"):
        plot_runs([two_runs[0], tmp_path], out_dir=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()  # every run is validated before anything is written
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs([])
