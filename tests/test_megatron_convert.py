"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py (megatron-bridge, megatron-core dist ckpt).

A tiny Qwen3-MoE goes HF → Megatron at world 1 and at EP=2 → HF (converted back at the other layout, so the
checkpoint's layout independence is exercised too): the weights come back bit-identical, the HF logits equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_dppo.megatron import megatron_backend_installed

if not megatron_backend_installed():
    pytest.skip("the Megatron backend needs megatron-core and megatron-bridge", allow_module_level=True)

from nemo_dppo.megatron.parity import make_policy_dirs
from nemo_dppo.models.tiny_moe import load_model_dir

ROOT = Path(__file__).resolve().parent.parent
TO_MEGATRON = ROOT / "tools" / "convert_hf_to_megatron.py"
TO_HF = ROOT / "tools" / "convert_megatron_to_hf.py"


def _tool(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_policy_dirs(tmp_path_factory.mktemp("convert_policy"))[0]


@pytest.mark.parametrize(
    ("to_megatron", "to_hf"), [([], ["--ep", "2"]), (["--ep", "2"], [])], ids=["w1_to_ep2", "ep2_to_w1"]
)
def test_round_trip_is_bit_identical(hf_dir, tmp_path, to_megatron, to_hf):
    megatron_dir, back = tmp_path / "megatron", tmp_path / "hf_back"
    done = _tool(TO_MEGATRON, str(hf_dir), str(megatron_dir), *to_megatron)
    assert done.returncode == 0, done.stderr
    meta = json.loads((megatron_dir / "conversion.json").read_text())
    assert meta["written_with_layout"]["ep"] == (2 if to_megatron else 1)
    assert (megatron_dir / "weights" / "metadata.json").is_file()
    done = _tool(TO_HF, str(megatron_dir), str(back), *to_hf)
    assert done.returncode == 0, done.stderr

    original, converted = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(converted)
    assert all(torch.equal(original[name], converted[name]) for name in original)
    model_a, tokenizer = load_model_dir(str(hf_dir))
    model_b, _ = load_model_dir(str(back))
    ids = torch.tensor([tokenizer.encode("12+34=46"), tokenizer.encode("99+99=19")])
    with torch.no_grad():
        assert (model_a(input_ids=ids).logits - model_b(input_ids=ids).logits).abs().max() <= 1e-5


def test_user_errors_are_one_line(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cases = [
        (TO_MEGATRON, [str(tmp_path / "missing"), str(tmp_path / "out")], "HF model directory not found"),
        (
            TO_MEGATRON,
            [str(llama), str(tmp_path / "out")],
            "architecture 'llama' ['LlamaForCausalLM'] is not supported",
        ),
        (TO_HF, [str(tmp_path), str(tmp_path / "out")], "is not a Megatron checkpoint written by"),
    ]
    for script, args, message in cases:
        done = _tool(script, *args)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error:") and message in lines[0], lines[0]
