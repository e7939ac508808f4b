"""Names of the per-sample tensors in NeMo-RL's training batch that DPPOLossFn reads (all [B, S] unless noted).

NeMo-RL's own keys (`ClippedPGLossDataDict`, v0.5–main); every per-token key is aligned with `input_ids` (entry t
belongs to token t) and losses slice `[:, 1:]` to align with next-token log-probs:

- `input_ids`            token ids (prompt + response, right-padded)
- `advantages`           A per token
- `generation_logprobs`  log μ of each token from the rollout engine (vLLM) — DPPO's anchor
- `prev_logprobs`        log π_old recomputed by the policy before the update (decoupled modes, `minirl`)
- `token_mask`           1 on response tokens the loss trains on
- `sample_mask`          [B] 1 for samples that count (NeMo-RL's `loss_multiplier`)

Added by nemo-dppo's Top-K plumbing (`nemo_dppo.nemo_rl.launch.topk_plumbing`), same alignment, [B, S, K]:
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ADVANTAGES = "advantages"
GENERATION_LOGPROBS = "generation_logprobs"
PREV_LOGPROBS = "prev_logprobs"
TOKEN_MASK = "token_mask"
SAMPLE_MASK = "sample_mask"

#: [B, S, K] int64: the rollout's K most likely ids at each generated position (sampled id in slot K when outside).
TOPK_IDS = "generation_topk_ids"
#: [B, S, K] float32: log μ at those ids.
TOPK_LOGPROBS = "generation_topk_logprobs"
