#!/usr/bin/env python3
"""Submit the paper's comparison to Slurm as one command, then collect its run directories for `nemo-dppo plot`.

    python tools/sweep.py submit                                   # 4 jobs of slurm/single_node.sbatch
    python tools/sweep.py submit --template dppo --sbatch-arg=--nodes=2 --sbatch-arg=--gpus-per-node=8 \\
        --config conf/base.yaml --overrides "steps=500"
    python tools/sweep.py collect runs/sweep-20260101-120000 --wait --plot

`submit` validates every preset and the config before submitting anything, submits one job per preset (same
CONFIG / OVERRIDES, RUN_DIR = SWEEP_DIR/<preset>, logs in SWEEP_DIR/logs/<job id>/), writes SWEEP_DIR/sweep.json and
prints the run directories and the `nemo-dppo plot` command. `collect` reads sweep.json, shows each job's state
(`scontrol show job`; `sacct` when the controller has forgotten the job), optionally waits until every job has
ended and draws the comparison (`nemo-dppo plot ... --out SWEEP_DIR/plots`). Exit status: 0 when every job
COMPLETED (or, without --wait, none has failed yet), 1 otherwise, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATES = {"single_node": PROJECT / "slurm" / "single_node.sbatch", "dppo": PROJECT / "slurm" / "dppo.sbatch"}
#: The paper's comparison: preset (conf/loss/<preset>.yaml) → label.
PAPER_PRESETS = {
    "dppo_binary_tv": "DPPO-Binary-TV",
    "dppo_binary_kl": "DPPO-Binary-KL",
    "grpo": "GRPO ε 0.2/0.2",
    "grpo_clip_higher": "GRPO ε 0.2/0.28",
}
MANIFEST = "sweep.json"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
ACTIVE |= {"REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class SweepError(Exception):
    """A bad argument or a failed submission: one line, exit status 2."""


def loss_presets() -> list[str]:
    return sorted(p.stem for p in (PROJECT / "conf" / "loss").glob("*.yaml"))


def _validate(presets: list[str], config: Path | None, template: str) -> None:
    known = loss_presets()
    unknown = [p for p in presets if p not in known]
    if unknown:
        raise SweepError(f"unknown loss preset(s) {', '.join(unknown)}; choose from: {' '.join(known)}")
    if len(set(presets)) != len(presets):
        raise SweepError("a preset is listed twice")
    if config is not None and not config.is_file():
        raise SweepError(f"config file {config} not found")
    if template not in TEMPLATES:
        raise SweepError(f"unknown template {template}; choose from: {' '.join(TEMPLATES)}")


def submit(args: argparse.Namespace) -> int:
    presets = [p for p in args.presets.replace(",", " ").split() if p]
    config = Path(args.config).resolve() if args.config else None
    _validate(presets, config, args.template)
    for item in shlex.split(args.overrides):
        key = item.split("=", 1)[0]
        if "=" not in item or key in ("run_dir", "resume", "loss"):
            raise SweepError(f"--overrides: {item!r} must be key=value (run_dir, resume and loss are set per run)")
    sweep_dir = Path(args.sweep_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (sweep_dir / MANIFEST).exists():
        raise SweepError(f"{sweep_dir / MANIFEST} exists: choose another --sweep-dir")
    if not args.dry_run and shutil.which("sbatch") is None:
        raise SweepError("sbatch is not on PATH (is this a Slurm login node?)")

    runs = []
    for preset in presets:
        env = {
            "LOSS_MODE": preset,
            "OVERRIDES": f"{args.overrides} threads={args.threads}".strip() if args.threads else args.overrides,
            "RUN_DIR": str(sweep_dir / preset),
            "LOG_DIR": str(sweep_dir / "logs"),
        }
        if config is not None:
            env["CONFIG"] = str(config)
        cmd = ["sbatch", "--parsable", f"--job-name=dppo-{preset}", f"--output={sweep_dir}/logs/slurm-%x-%j.out"]
        cmd += [*args.sbatch_arg, str(TEMPLATES[args.template])]
        if args.dry_run:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
            continue
        (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
        # The job gets this environment (sbatch's default --export=ALL) minus template parameters set here before.
        job_env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "RESUME", "WORKDIR")} | env
        if args.threads:
            job_env["OMP_NUM_THREADS"] = str(args.threads)
        done = subprocess.run(cmd, env=job_env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            _write_manifest(sweep_dir, args, runs)
            raise SweepError(f"sbatch failed for {preset}: {done.stderr.strip() or done.stdout.strip()}")
        job_id = done.stdout.strip().split(";")[0]
        runs.append(
            {"preset": preset, "label": PAPER_PRESETS.get(preset, preset), "job_id": job_id, "run_dir": env["RUN_DIR"]}
        )
        print(f"submitted {preset}: job {job_id}, run dir {env['RUN_DIR']}")
    if args.dry_run:
        return 0
    _write_manifest(sweep_dir, args, runs)
    print(f"sweep: {sweep_dir / MANIFEST}")
    print(f"when done:  python tools/sweep.py collect {sweep_dir} --plot")
    print("or:         " + _plot_command(sweep_dir, runs))
    return 0


def _write_manifest(sweep_dir: Path, args: argparse.Namespace, runs: list[dict[str, str]]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "template": args.template,
        "config": args.config,
        "overrides": args.overrides,
        "sbatch_args": args.sbatch_arg,
        "runs": runs,
    }
    (sweep_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _plot_command(sweep_dir: Path, runs: list[dict[str, str]]) -> str:
    return shlex.join(["nemo-dppo", "plot", *(r["run_dir"] for r in runs), "--out", str(sweep_dir / "plots")])


def job_state(job_id: str) -> str:
    """The job's state from `scontrol show job`, else `sacct`, else UNKNOWN."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False)
    match = re.search(r"\bJobState=(\S+)", done.stdout)
    if done.returncode == 0 and match:
        return match.group(1)
    if shutil.which("sacct"):
        done = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, check=False
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.split()[0]
    return "UNKNOWN"


def collect(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.sweep_dir).resolve()
    try:
        manifest = json.loads((sweep_dir / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"cannot read {sweep_dir / MANIFEST}: {err}") from None
    runs = manifest["runs"]
    deadline = time.monotonic() + args.timeout
    while True:
        states = {r["job_id"]: job_state(r["job_id"]) for r in runs}
        if not args.wait or not any(s in ACTIVE for s in states.values()):
            break
        if time.monotonic() > deadline:
            print(f"timeout: jobs still active after {args.timeout:g}s", file=sys.stderr)
            break
        time.sleep(args.poll)
    for r in runs:
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        steps = sum(1 for _ in metrics.open()) if metrics.is_file() else 0
        print(
            f"{r['preset']:<20} job {r['job_id']:<8} {states[r['job_id']]:<10} {steps:>5} metric lines  {r['run_dir']}"
        )
    finished = [r for r in runs if states[r["job_id"]] == "COMPLETED"]
    failed = [r for r in runs if states[r["job_id"]] not in ACTIVE | {"COMPLETED", "UNKNOWN"}]
    ok = not failed and (not args.wait or len(finished) == len(runs))
    if args.plot:
        have = [r for r in runs if (Path(r["run_dir"]) / "metrics.jsonl").is_file()]
        if not have:
            print("nothing to plot yet", file=sys.stderr)
            return 1
        cmd = shlex.split(_plot_command(sweep_dir, have))
        print("$ " + shlex.join(cmd), flush=True)
        ok = subprocess.run(cmd, check=False).returncode == 0 and ok
    else:
        print(_plot_command(sweep_dir, runs))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("submit", help="submit one job per loss preset")
    sp.add_argument("--template", default="single_node", help="single_node (default) or dppo")
    sp.add_argument(
        "--presets",
        default=",".join(PAPER_PRESETS),
        help=f"comma-separated conf/loss presets (default: {','.join(PAPER_PRESETS)})",
    )
    sp.add_argument("--config", default=None, help="CONFIG for every run (default: the template's)")
    sp.add_argument("--overrides", default="", help='OVERRIDES for every run, e.g. "steps=100 seed=1"')
    sp.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: jobs sharing a node's cores each get one; 0: torch's "
                         "default, for one run per node)")  # fmt: skip
    sp.add_argument("--sweep-dir", default=None, help="where the runs go (default runs/sweep-<date-time>)")
    sp.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch argument, repeatable: --sbatch-arg=--nodes=2 --sbatch-arg=-A --sbatch-arg=acct",
    )
    sp.add_argument("--dry-run", action="store_true", help="print the submissions, submit nothing")
    sp.set_defaults(func=submit)
    cp = sub.add_parser("collect", help="job states, run directories and the comparison plot of a sweep")
    cp.add_argument("sweep_dir")
    cp.add_argument("--wait", action="store_true", help="wait until every job has ended")
    cp.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits at most")
    cp.add_argument("--poll", type=float, default=5.0, help="seconds between polls with --wait")
    cp.add_argument("--plot", action="store_true", help="run nemo-dppo plot on the runs that have metrics")
    cp.set_defaults(func=collect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
