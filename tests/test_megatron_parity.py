"""The Megatron training engine against the `hf` engine (identical weights and batch), and R3 on megatron-core.

Each layout runs `python -m nemo_dppo.megatron.parity` on its ranks (gloo on 127.0.0.1): log π_old, π at the
Top-K ids and the entropy (R3 off and on), one DPPO-Top-K-TV step's loss and gradient norm, and log π after the
step must equal the `hf` engine's within 1e-5 (fp32). The trainers start from the rollout policy with perturbed
routers, so R3 really overrides their routing: the experts used in training must equal the recorded ones
(disagreement 0) while the routers' own choice differs, and the router weights must get gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_dppo.megatron import megatron_backend_installed

if not megatron_backend_installed():
    pytest.skip("the Megatron backend needs megatron-core and megatron-bridge", allow_module_level=True)

from nemo_dppo.distributed.spawn import spawn
from nemo_dppo.megatron.parity import make_policy_dirs

TOL = 1e-5
EQUAL_KEYS = ("logprobs_no_r3", "topk_logprobs_no_r3", "entropy_no_r3", "logprobs_r3", "topk_logprobs_r3",
              "entropy_r3", "loss", "grad_norm", "logprobs_after_step")  # fmt: skip

LAYOUTS = {
    "world1": ([], 1),
    "tp2": (["--tp", "2"], 2),
    "ep2": (["--ep", "2"], 2),
    "tp2_ep2": (["--tp", "2", "--ep", "2", "--dp", "2"], 4),
    "pp2": (["--pp", "2", "--micro-batch-size", "2"], 2),  # 1F1B over 4 micro-batches, send/recv over gloo
}
SLOW = {"tp2_ep2", "pp2"}


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_policy_dirs(tmp_path_factory.mktemp("parity_policy"))


def _run_parity(dirs: tuple[Path, Path], flags: list[str], world: int, out: Path) -> dict:
    args = ["-m", "nemo_dppo.megatron.parity", "--rollout-dir", str(dirs[0]), "--train-dir", str(dirs[1]),
            "--out", str(out), *flags]  # fmt: skip
    # A lone process creates its own world-1 group; several ranks are started like `nemo-dppo train` does.
    code = subprocess.run([sys.executable, *args], check=False).returncode if world == 1 else spawn(args, world)
    assert code == 0, f"parity run failed with exit code {code}"
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in LAYOUTS]
)
def test_one_step_equals_the_hf_engine(policy_dirs, tmp_path, layout):
    flags, world = LAYOUTS[layout]
    report = _run_parity(policy_dirs, flags, world, tmp_path / "parity.json")
    assert report["layout"]["world"] == world
    for key in EQUAL_KEYS:
        assert report[key] <= TOL, (key, report[key])
    assert report["logprobs_moved"] > 1e-2  # the step changed the policy, so the post-step equality means something
    # R3 with megatron-core's RouterReplay: the experts used are the recorded ones; the routers would choose others.
    assert report["routing_used_disagreement_r3"] == 0.0 and report["hf_used_disagreement_r3"] == 0.0
    assert report["routing_own_disagreement_r3"] > 0.1
    assert report["routing_used_disagreement_no_r3"] > 0.1  # without R3 the perturbed routers really differ
    assert report["router_grad_norm"] > 0  # (this rank's routers: pipeline stage 0's under pp > 1)
