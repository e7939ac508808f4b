"""The NeMo-RL recipe checker: load a recipe as NeMo-RL does, check keys, parallel layout, batches, without a cluster.

Needs omegaconf and hydra-core, not NeMo-RL; the YAML loader is `nemo_dppo.config.load_yaml` (one for the package).
"""
