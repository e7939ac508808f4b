"""DPPO for NeMo-RL: the loss function (this folder), the launch kit (`launch/`), the recipe checker (`recipes/`).

- `loss.DPPOLossFn`, `loss_settings`, `metrics`, `from_logits`, `data_keys`   the loss (LOGPROB / LOGIT, v0.5 logits)
- `versions`                          every NeMo-RL version difference handled (enums, loss attributes, entry)
- `launch/run.py`, `launch/topk_plumbing.py`, `launch/vllm_*.py`   GRPO entry with DPPOLossFn, Top-K into vLLM
- `recipes/`                          recipe loading (`nemo_dppo.config.load_yaml`) and checks, without a cluster
- `python -m nemo_dppo.nemo_rl.run CONFIG ...` / `python -m nemo_dppo.nemo_rl.validate FILE`   the two commands

Importing this package (and `loss`) needs only torch and nemo_dppo: NeMo-RL's Megatron workers load it to
unpickle `DPPOLossFn`. `launch` and `recipes` additionally need omegaconf and hydra-core.
"""

from nemo_dppo.nemo_rl.loss import DPPOLossFn
from nemo_dppo.nemo_rl.loss_settings import DPPOLossSettings, loss_settings

__all__ = ["DPPOLossFn", "DPPOLossSettings", "loss_settings"]
