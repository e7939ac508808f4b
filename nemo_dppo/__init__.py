"""nemo-dppo: Divergence Proximal Policy Optimization (Qi et al. 2026) for LLM RL on the NVIDIA stack."""

__version__ = "0.1.0"
