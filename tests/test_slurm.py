"""The Slurm templates (slurm/) against a real Slurm: submit, read states with `scontrol`, check logs and runs.

Start a one-node cluster with `bash tools/ci/slurm_up.sh` (`.ci/run` does); without a controller that answers
`scontrol ping`, the `slurm`-marked tests skip (`pytest -m "not slurm"` deselects them). The tests without the
marker (template syntax, parameter checks, `tools/sweep.py --dry-run`) need neither Slurm nor a GPU.

Every wait is bounded; a job still active at the end of a test is cancelled. `sbatch --wait` is not used (it
polls every 32 s): `scontrol show job` is polled every 0.5 s instead (no accounting, so no `sacct`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
SINGLE_NODE = PROJECT / "slurm" / "single_node.sbatch"
DPPO = PROJECT / "slurm" / "dppo.sbatch"
SWEEP = PROJECT / "tools" / "sweep.py"
#: Template parameters: cleared from the environment the tests submit with, then set per test.
PARAMETERS = ("CONFIG", "LOSS_MODE", "OVERRIDES", "CONTAINER", "MOUNTS", "GPUS_PER_NODE", "RUN_DIR", "RESUME")
PARAMETERS += ("ENTRY", "LOG_DIR", "WORKDIR", "REQUEUE", "PROJECT_DIR", "RAY_PORT", "RAY_TIMEOUT", "RAY_START_ARGS")
#: A few seconds per step on 2 cores.
TINY = (
    "task.name=arithmetic eval.k=0 "  # the default config file is the sanity task; these jobs test the plumbing
    "save_every=2 eval_every=2 progress=false model.hidden_size=64 task.num_digits=1 task.num_eval_prompts=8 "
    "warm_start.steps=30 rollout.n=4 rollout.max_new_tokens=4 train.prompts_per_step=4 train.mini_batches=2"
)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
JOB_TIMEOUT = 240.0  # seconds, for one job on a loaded 2-core machine


def _slurm_skip_reason() -> str | None:
    if shutil.which("scontrol") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (start a local cluster: bash tools/ci/slurm_up.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if ping.returncode != 0 or "is UP" not in ping.stdout:
        return "no Slurm controller answers scontrol ping (start one: bash tools/ci/slurm_up.sh)"
    return None


_SKIP_REASON = _slurm_skip_reason()


def needs_slurm(test):
    """Marked `slurm`; skipped with the reason when no Slurm controller answers."""
    return pytest.mark.slurm(pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")(test))


# ------------------------------------------------------------------------------------------------------- helpers
def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


class Jobs:
    """Submits jobs from a test's tmp dir and cancels whatever is still active when the test ends."""

    def __init__(self, tmp_path: Path, cache: Path) -> None:
        self.dir = tmp_path
        self.cache = cache
        self.ids: list[str] = []

    def env(self, **params: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PARAMETERS}
        return env | params

    def submit(self, template: Path, *sbatch_args: str, **params: str) -> str:
        cmd = ["sbatch", "--parsable", f"--chdir={self.dir}", f"--output={self.dir}/job-%j.out", *sbatch_args]
        done = subprocess.run(
            [*cmd, str(template)], env=self.env(**params), cwd=self.dir, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        return job_id

    def tiny(self, steps: int, **params: str) -> dict[str, str]:
        """Parameters of a tiny CPU run of `steps` steps in this test's tmp dir."""
        overrides = f"steps={steps} {TINY} warm_start.cache_dir={self.cache} {params.pop('OVERRIDES', '')}"
        return {"OVERRIDES": overrides.strip(), "RUN_DIR": str(self.dir / "run")} | params

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT, until=None) -> dict[str, str]:
        """Poll `scontrol` until the job has ended (or `until(info)` holds); fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info = job_info(job_id)
            if until(info) if until else info["JobState"] not in ACTIVE:
                return info
            if time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:g}s:\n{self.log(job_id)}")
            time.sleep(0.5)

    def log(self, job_id: str) -> str:
        path = self.dir / f"job-{job_id}.out"
        return path.read_text() if path.exists() else "(no job log)"

    def cancel(self) -> None:
        for job_id in self.ids:
            subprocess.run(["scancel", job_id], capture_output=True, check=False)


@pytest.fixture(scope="module")
def slurm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One warm-start cache for every job of this module (the first job builds it)."""
    return tmp_path_factory.mktemp("slurm_warm_start")


@pytest.fixture
def jobs(tmp_path: Path, slurm_cache: Path) -> Iterator[Jobs]:
    submitted = Jobs(tmp_path, slurm_cache)
    yield submitted
    submitted.cancel()


def _node_names() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True)
    return sorted(set(out.stdout.split()))


def _pyxis_flags_accepted() -> bool:
    out = subprocess.run(["srun", "--help"], capture_output=True, text=True, check=False)
    return "--container-image" in out.stdout


def metric_steps(run_dir: Path) -> list[int]:
    """Steps logged so far (complete lines only: the trainer may be writing the last one)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line]


def assert_completed_run(jobs: Jobs, job_id: str, info: dict[str, str], run_dir: Path, steps: int) -> Path:
    """COMPLETED, driver log present, a checkpoint of the last step, metrics of steps 0..steps. Returns the log dir."""
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info.get('ExitCode')}\n{jobs.log(job_id)}"
    assert info["ExitCode"] == "0:0"
    logs = Path(re.search(r"logs in (\S+),", jobs.log(job_id)).group(1))
    assert logs.name == job_id and (logs / "driver.log").is_file()
    assert "run directory:" in (logs / "driver.log").read_text()
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and latest.read_text().strip() == f"step_{steps:06d}"
    assert metric_steps(run_dir) == list(range(steps + 1))
    return logs


# --------------------------------------------------------------------------------------- no Slurm needed
@pytest.mark.parametrize("template", [SINGLE_NODE, DPPO, PROJECT / "slurm" / "common.sh"], ids=lambda p: p.name)
def test_templates_parse(template: Path) -> None:
    assert subprocess.run(["bash", "-n", str(template)], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    ("template", "params", "message"),
    [
        (SINGLE_NODE, {"LOSS_MODE": "bogus"}, "error: LOSS_MODE=bogus is not a loss preset; choose one of: "),
        (DPPO, {"CONFIG": "/nonexistent/dppo.yaml"}, "error: CONFIG=/nonexistent/dppo.yaml: config file not found"),
        (DPPO, {"ENTRY": "megatron"}, "error: ENTRY=megatron is not an entry point"),
        (SINGLE_NODE, {"OVERRIDES": "steps=3 run_dir=x"}, "error: OVERRIDES: set RUN_DIR=... instead of run_dir="),
    ],
    ids=["loss_mode", "config", "entry", "run_dir"],
)
def test_bad_parameter_fails_in_bash(tmp_path: Path, template: Path, params: dict[str, str], message: str) -> None:
    """The parameter checks run before anything else, also outside a job (a fake job id, no scontrol needed)."""
    env = {k: v for k, v in os.environ.items() if k not in PARAMETERS}
    env |= {"SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(tmp_path), "PROJECT_DIR": str(PROJECT), **params}
    done = subprocess.run(["bash", str(template)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_sweep_dry_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SWEEP), "submit", "--dry-run", "--sweep-dir", str(tmp_path), "--overrides", "steps=5"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    presets = ["dppo_binary_tv", "dppo_binary_kl", "grpo", "grpo_clip_higher"]
    assert len(lines) == 4
    for line, preset in zip(lines, presets, strict=True):
        assert f"LOSS_MODE={preset} " in line and f"RUN_DIR={tmp_path / preset} " in line
        assert "OVERRIDES='steps=5 threads=1'" in line  # jobs sharing a node's cores: one torch thread each
        assert line.endswith(
            f"sbatch --parsable --job-name=dppo-{preset} --output={tmp_path}/logs/slurm-%x-%j.out {SINGLE_NODE}"
        )
    bad = subprocess.run(
        [sys.executable, str(SWEEP), "submit", "--dry-run", "--presets", "grpo,nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown loss preset(s) nope")


# ------------------------------------------------------------------------------------------ real Slurm
@pytest.mark.parametrize(
    ("template", "params", "message"),
    [
        (SINGLE_NODE, {"LOSS_MODE": "bogus"}, "error: LOSS_MODE=bogus is not a loss preset"),
        (DPPO, {"LOSS_MODE": "bogus"}, "error: LOSS_MODE=bogus is not a loss preset"),
        (DPPO, {"CONFIG": "missing.yaml"}, "config file not found"),
        (SINGLE_NODE, {"OVERRIDES": "loss.modee=x"}, "error: override loss.modee=x: unknown key 'loss.modee'"),
    ],
    ids=["single_node-loss_mode", "dppo-loss_mode", "dppo-config", "single_node-override"],
)
@needs_slurm
def test_bad_parameter_fails_fast(jobs: Jobs, template: Path, params: dict[str, str], message: str) -> None:
    start = time.monotonic()
    job_id = jobs.submit(template, **params)
    info = jobs.wait(job_id, timeout=60)
    log = jobs.log(job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert log.count("\n") == 1 and log.startswith("error: ") and message in log, log
    assert not (jobs.dir / "runs").exists()  # no log dir, no run dir: nothing was started
    assert time.monotonic() - start < 45


@needs_slurm
def test_sweep_single_node(jobs: Jobs) -> None:
    """tools/sweep.py submits single_node.sbatch per preset; each run completes; `collect --plot` overlays them.

    Two of the paper's four presets (the time of this file); test_sweep_dry_run checks the four submissions."""
    sweep_dir = jobs.dir / "sweep"
    presets = ["dppo_binary_kl", "grpo_clip_higher"]
    tiny = jobs.tiny(2)["OVERRIDES"]
    done = subprocess.run(
        [sys.executable, str(SWEEP), "submit", "--sweep-dir", str(sweep_dir), "--presets", ",".join(presets),
         "--overrides", tiny, f"--sbatch-arg=--chdir={jobs.dir}"],
        env=jobs.env(), capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    assert [r["preset"] for r in runs] == presets
    jobs.ids += [r["job_id"] for r in runs]
    for run in runs:
        info = jobs.wait(run["job_id"], timeout=JOB_TIMEOUT)
        jobs.dir.joinpath(f"job-{run['job_id']}.out").symlink_to(info["StdOut"])
        logs = assert_completed_run(jobs, run["job_id"], info, Path(run["run_dir"]), steps=2)
        assert logs.parent == sweep_dir / "logs"
        assert f"loss={run['preset']} " in jobs.log(run["job_id"])
    loss = {r["preset"]: yaml.safe_load(Path(r["run_dir"], "config.yaml").read_text())["loss"] for r in runs}
    assert loss["dppo_binary_kl"]["mode"] == "dppo_binary_kl"
    assert (loss["grpo_clip_higher"]["mode"], loss["grpo_clip_higher"]["clip_high"]) == ("ppo_clip", 0.28)
    collected = subprocess.run(
        [sys.executable, str(SWEEP), "collect", str(sweep_dir), "--wait", "--timeout", "30", "--plot"],
        capture_output=True, text=True, check=False, timeout=180,
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert collected.stdout.count("COMPLETED") == 2
    assert any((sweep_dir / "plots").glob("*.png"))


@needs_slurm
def test_dppo_ray(jobs: Jobs) -> None:
    """dppo.sbatch: Ray head on the first node (1 declared GPU per node), a worker on a second node when the cluster
    has one (SLURM_CI_NODES=2), the driver once all are registered, clean teardown.

    With the pyxis stand-in registered (SLURM_CI_PYXIS=1 slurm_up.sh) every step also gets the --container-* flags
    (ignored there: the steps run on the host), so the CONTAINER path of the template runs too."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip('ray is not installed (pip install "ray[default]"); dppo.sbatch starts a Ray cluster')
    nodes = min(2, len(_node_names()))
    params = {"GPUS_PER_NODE": "1"}
    if _pyxis_flags_accepted():
        params |= {"CONTAINER": "nvcr.io/nvidia/nemo-rl:ci-ignored", "MOUNTS": f"{jobs.dir}:{jobs.dir}"}
    job_id = jobs.submit(DPPO, f"--nodes={nodes}", **jobs.tiny(2, **params))
    info = jobs.wait(job_id)
    logs = assert_completed_run(jobs, job_id, info, jobs.dir / "run", steps=2)
    log = jobs.log(job_id)
    assert ("container: nvcr.io/nvidia/nemo-rl:ci-ignored" in log) == ("CONTAINER" in params)
    assert f"Ray cluster ready: {nodes} node(s), {nodes} GPU(s)" in log
    assert re.search(r"driver: env RAY_ADDRESS=\S+:\d+ nemo-dppo train ", log)
    assert "Ray runtime started" in (logs / "ray-head.log").read_text()
    allocated = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True)
    for worker in allocated.stdout.split()[1:]:
        assert "Ray runtime started" in (logs / f"ray-worker-{worker}.log").read_text()
    # Teardown: the job's Ray session dirs are gone and no process of this job's Ray is left.
    assert not list(Path("/tmp").glob(f"ray-{job_id}-*"))
    left = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job_id}-"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


@needs_slurm
def test_preemption_checkpoints_requeues_and_resumes(jobs: Jobs) -> None:
    """USR1 to the batch script (what --signal=B:USR1@N sends): checkpoint, requeue, resume from that step.

    The run is long enough (tiny steps take ~0.1-0.3 s) that the signal, which travels scancel → slurmd → batch
    script → driver, lands well before the last step."""
    steps = 40
    run_dir = jobs.dir / "run"
    job_id = jobs.submit(SINGLE_NODE, **jobs.tiny(steps, OVERRIDES=f"save_every={steps}"))
    jobs.wait(job_id, until=lambda _: max(metric_steps(run_dir), default=0) >= 1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    # The job requeues itself; the next attempt starts once Slurm's requeue hold (cred_expire, 20 s here) is over.
    info = jobs.wait(job_id, timeout=120, until=lambda i: i["Restarts"] == "1" or i["JobState"] not in ACTIVE)
    assert info["Restarts"] == "1", jobs.log(job_id)
    info = jobs.wait(job_id)
    logs = assert_completed_run(jobs, job_id, info, run_dir, steps=steps)
    driver = (logs / "driver.log").read_text()
    flat = driver.replace("\n", "")  # in case the console wrapped a long path
    written = re.search(r"SIGUSR1: checkpoint written at step (\d+); exiting", driver)
    assert written, driver
    step = int(written.group(1))
    assert 1 <= step < steps
    assert re.search(rf"resumed from \S+step_{step:06d} \(step {step}\)", flat), driver
    assert "attempt 1" in driver and "resume=true" in jobs.log(job_id)
    assert f"requeueing job {job_id}" in jobs.log(job_id)
