"""The NeMo-RL launch kit: the run entry (`run.py`) and the Top-K plumbing into NeMo-RL's vLLM workers.

Needs NeMo-RL (and omegaconf / hydra-core) at run time; the loss (`nemo_dppo.nemo_rl.loss`) does not import it.
"""
