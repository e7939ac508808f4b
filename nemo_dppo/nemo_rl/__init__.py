"""DPPO for NeMo-RL: the loss function, the Top-K rollout plumbing, the run entry point and the recipe validator.

- `nemo_dppo.nemo_rl.loss.DPPOLossFn`          the NeMo-RL loss (LOGPROB / LOGIT input types, v0.5 logits API)
- `nemo_dppo.nemo_rl.loss_settings`            `loss_fn:` config section → `LossConfig` (key mapping)
- `nemo_dppo.nemo_rl.topk_plumbing`            vLLM Top-K log-probs → `generation_topk_*` training-batch keys
- `python -m nemo_dppo.nemo_rl.run CONFIG ...`  NeMo-RL GRPO setup with DPPOLossFn swapped in, then `grpo_train`
- `python -m nemo_dppo.nemo_rl.validate FILE`   recipe checks (keys, parallel layout, batches) without a cluster

Importing this package (and `loss`) needs only torch and nemo_dppo: NeMo-RL's Megatron workers load it to
unpickle `DPPOLossFn`. `run` and `validate` additionally need omegaconf and hydra-core.
"""

from nemo_dppo.nemo_rl.loss import DPPOLossFn
from nemo_dppo.nemo_rl.loss_settings import DPPOLossSettings, loss_settings

__all__ = ["DPPOLossFn", "DPPOLossSettings", "loss_settings"]
