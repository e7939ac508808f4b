"""Contract tests of `nemo_dppo.nemo_rl` against NeMo-RL's calling convention, reproduced from its source.

NeMo-RL cannot be installed here (not on PyPI), so a small harness reproduces what its source does around a loss
(read: github.com/NVIDIA-NeMo/RL v0.5.0, v0.6.0, v0.7.0 and main):

- the global batch's normalisation factors, as `nemo_rl/models/megatron/data.py` computes them:
  `global_valid_seqs = Σ sample_mask`, `global_valid_toks = Σ token_mask[:, 1:] · sample_mask[:, None]`;
- micro-batches sliced along the batch dimension, each loss `backward()`-ed (gradients accumulate);
- the three call forms: v0.6+ LOGPROB (`prepare_loss_input` → `loss_fn(data=, global_valid_seqs=,
  global_valid_toks=, next_token_logprobs=)` with log-probs from `log_softmax(logits[:, :-1])` gathered at
  `input_ids[:, 1:]`), v0.6+ LOGIT (`..., logits=`), v0.5 (`loss_fn(logits, data, seqs, toks,
  vocab_parallel_rank=, vocab_parallel_group=, context_parallel_group=)`);
- sequence packing's per-sequence calls (`SequencePackingLossWrapper`: one sequence at a time, tensors with a
  sequence dimension cut to the unpadded length, logits keep their padded length);
- `grpo_train`'s reduction of micro-batch metrics (`probs_ratio_min`/`_max` by min/max skipping ±inf, the rest
  summed).

The invariant: the sum of micro-batch losses and gradients equals `compute_policy_loss` on the whole batch, for
every loss mode. When nemo_rl *is* importable, `TestRealNemoRL` runs the same comparison through NeMo-RL's own
`prepare_loss_input` / wrappers / `BatchedDataDict`.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import socket
import subprocess
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_dppo.losses import LOSS_MODES, LossConfig, PolicyLossInput, compute_policy_loss, get_mode
from nemo_dppo.nemo_rl import data_keys as keys
from nemo_dppo.nemo_rl.from_logits import UnsupportedParallelism
from nemo_dppo.nemo_rl.launch.topk_plumbing import (
    TOPK_ENV,
    TOPK_WORKER_FQN,
    attach_topk_to_responses,
    backfill_topk,
    copy_topk_keys,
    install_topk_plumbing,
)
from nemo_dppo.nemo_rl.launch.vllm_topk import LOGPROB_FLOOR, batch_topk, topk_with_sampled
from nemo_dppo.nemo_rl.loss import DPPOLossFn
from nemo_dppo.nemo_rl.loss_settings import LossSettingsError, loss_settings
from nemo_dppo.nemo_rl.versions import NEMO_RL_IMPORTABLE, LossInputType, LossType, MetricNormalizer

REPO = Path(__file__).resolve().parent.parent
ALL_MODES = sorted(LOSS_MODES)
BINARY_MODES = [m for m in ALL_MODES if not get_mode(m).needs_topk]
K = 4
VOCAB = 40

# --- a NeMo-RL-shaped batch ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    data: dict[str, torch.Tensor]  # NeMo-RL training-batch keys, [B, S] (+ [B, S, K] Top-K)
    logits: torch.Tensor  # [B, S, V] the policy's logits (a leaf: gradients are compared on it)


def make_batch(seed: int = 0, batch: int = 7, seq: int = 13, dtype: torch.dtype = torch.float64) -> Batch:
    """Right-padded prompt + response rows; μ and π_old from perturbed logits so that masks trigger; one sample
    with `sample_mask` 0, one with advantage 0. Per-token keys are aligned with `input_ids` (entry t is token t),
    prompt and padding positions hold zeros, as NeMo-RL's flattened message logs do."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, VOCAB, generator=g, dtype=torch.float64) * 2.0
    logits[..., 3] += (torch.rand(batch, seq, generator=g) < 0.3) * 6.0  # confident rows (π near 1)
    mu_logits = logits + torch.randn(batch, seq, VOCAB, generator=g, dtype=torch.float64) * 1.2
    old_logits = logits + torch.randn(batch, seq, VOCAB, generator=g, dtype=torch.float64) * 0.6
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    token_mask = torch.zeros(batch, seq)
    for i in range(batch):
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(prompt + 1, seq + 1, (1,), generator=g))
        # the response is sampled from μ, one token at a time (teacher-forced here: ids drawn from μ's softmax)
        probs = torch.softmax(mu_logits[i, prompt - 1 : length - 1], dim=-1)
        input_ids[i, prompt:length] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        input_ids[i, length:] = 0  # padding
        token_mask[i, prompt:length] = 1
    sample_mask = torch.ones(batch)
    sample_mask[1] = 0
    advantages = (torch.randn(batch, generator=g) * 1.5)[:, None].expand(batch, seq).clone()
    advantages[2] = 0.0

    def token_logprobs(source: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(source[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(batch, 1, dtype=lp.dtype), lp], dim=1)

    response = token_mask.bool()
    generation_logprobs = torch.where(response, token_logprobs(mu_logits), 0.0)
    prev_logprobs = token_logprobs(old_logits)  # NeMo-RL recomputes π_old for every position
    mu_logp_all = torch.log_softmax(mu_logits, -1)
    top_vals, top_ids = mu_logp_all[:, :-1].topk(K, dim=-1)
    sampled = input_ids[:, 1:]
    missing = ~(top_ids == sampled[..., None]).any(-1)
    top_ids[..., -1] = torch.where(missing, sampled, top_ids[..., -1])
    top_vals = mu_logp_all[:, :-1].gather(-1, top_ids)
    topk_ids = torch.zeros(batch, seq, K, dtype=torch.long)
    topk_logprobs = torch.zeros(batch, seq, K, dtype=torch.float32)
    topk_ids[:, 1:] = torch.where(response[:, 1:, None], top_ids, 0)
    topk_logprobs[:, 1:] = torch.where(response[:, 1:, None], top_vals, 0.0).float()
    data = {
        keys.INPUT_IDS: input_ids,
        keys.ADVANTAGES: advantages.float(),
        keys.GENERATION_LOGPROBS: generation_logprobs.float(),
        keys.PREV_LOGPROBS: prev_logprobs.float(),
        keys.TOKEN_MASK: token_mask,
        keys.SAMPLE_MASK: sample_mask,
        keys.TOPK_IDS: topk_ids,
        keys.TOPK_LOGPROBS: topk_logprobs,
    }
    return Batch(data, logits.to(dtype).requires_grad_(True))


def global_counts(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo-RL's normalisation factors for one global batch (`nemo_rl/models/megatron/data.py`)."""
    seqs = data[keys.SAMPLE_MASK].sum()
    toks = (data[keys.TOKEN_MASK][:, 1:] * data[keys.SAMPLE_MASK].unsqueeze(-1)).sum()
    return seqs, toks


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`get_next_token_logprobs_from_logits` without TP: log_softmax(logits[:, :-1]) gathered at input_ids[:, 1:]."""
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def reduce_like_grpo_train(per_microbatch: list[dict[str, float]]) -> dict[str, float]:
    """`grpo_train`: min / max for the probs_ratio extrema (±inf skipped), sum for everything else."""
    out: dict[str, float] = {}
    for name in per_microbatch[0]:
        values = [m[name] for m in per_microbatch]
        if name in ("probs_ratio_min", "probs_ratio_clamped_min"):
            finite = [v for v in values if not math.isinf(v)]
            out[name] = min(finite) if finite else -1.0
        elif name in ("probs_ratio_max", "probs_ratio_clamped_max"):
            finite = [v for v in values if not math.isinf(v)]
            out[name] = max(finite) if finite else -1.0
        else:
            out[name] = sum(values)
    return out


def run_microbatches(
    loss_fn: DPPOLossFn, batch: Batch, micro_batch: int, api: str, *, group: dist.ProcessGroup | None = None
) -> tuple[float, dict[str, float]]:
    """NeMo-RL's train loop over one global batch: per micro-batch loss → backward; metrics reduced at the end."""
    data, logits = batch.data, batch.logits
    seqs, toks = global_counts(data)
    total, metrics = 0.0, []
    for start in range(0, data[keys.INPUT_IDS].shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        mb = {k: v[rows] for k, v in data.items()}
        mb_logits = logits[rows]
        if api == "logprob":
            loss, m = loss_fn(
                data=mb,
                global_valid_seqs=seqs,
                global_valid_toks=toks,
                next_token_logprobs=next_token_logprobs(mb_logits, mb[keys.INPUT_IDS]),
            )
        elif api == "logit":
            loss, m = loss_fn(data=mb, global_valid_seqs=seqs, global_valid_toks=toks, logits=mb_logits)
        elif api == "v0.5":
            loss, m = loss_fn(
                mb_logits,
                mb,
                seqs,
                toks,
                vocab_parallel_rank=None if group is None else dist.get_rank(group),
                vocab_parallel_group=group,
                context_parallel_group=None,
            )
        else:
            raise AssertionError(api)
        loss.backward()
        total += float(loss.detach())
        metrics.append(m)
    return total, reduce_like_grpo_train(metrics)


def whole_batch_reference(batch: Batch, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The loss core on the whole global batch in one call: loss, metrics, d loss / d logits.

    Its denominators are the batch's valid tokens and valid sequences (Σ sample_mask, as NeMo-RL counts them; the
    loss core alone would count every row, including those with sample_mask 0)."""
    data = batch.data
    logits = batch.logits.detach().clone().requires_grad_(True)
    logprobs = next_token_logprobs(logits, data[keys.INPUT_IDS])
    mask = data[keys.TOKEN_MASK][:, 1:] * data[keys.SAMPLE_MASK][:, None]
    topk_pi = None
    mode = get_mode(cfg.mode)
    if mode.needs_topk:
        topk_pi = torch.log_softmax(logits[:, :-1].detach(), -1).gather(-1, data[keys.TOPK_IDS][:, 1:])
    inputs = PolicyLossInput(
        logprobs,
        data[keys.GENERATION_LOGPROBS][:, 1:],
        data[keys.ADVANTAGES][:, 1:],
        mask,
        old_logprobs=data[keys.PREV_LOGPROBS][:, 1:] if mode.needs_old_logprobs else None,
        topk_rollout_logprobs=data[keys.TOPK_LOGPROBS][:, 1:] if mode.needs_topk else None,
        topk_train_logprobs=topk_pi,
        global_num_seqs=data[keys.SAMPLE_MASK].sum(),
    )
    loss, metrics = compute_policy_loss(inputs, cfg)
    loss.backward()
    return loss.detach(), metrics, logits.grad


def check_against_reference(
    loss_fn: DPPOLossFn, batch: Batch, micro_batch: int, api: str, tol: float = 1e-10
) -> dict[str, float]:
    ref_loss, ref_metrics, ref_grad = whole_batch_reference(batch, loss_fn.cfg)
    total, metrics = run_microbatches(loss_fn, batch, micro_batch, api)
    assert total == pytest.approx(float(ref_loss), rel=tol, abs=tol)
    torch.testing.assert_close(batch.logits.grad, ref_grad.to(batch.logits.dtype), rtol=tol, atol=tol)
    # metrics summed the NeMo-RL way equal the whole-batch metrics
    assert metrics["loss"] == pytest.approx(float(ref_loss), rel=tol, abs=tol)
    assert metrics["dppo_mask_frac"] == pytest.approx(ref_metrics["mask_frac"], abs=1e-6)
    assert metrics["probs_ratio"] == pytest.approx(ref_metrics["ratio_mean"], rel=1e-6)
    assert metrics["probs_ratio_min"] == pytest.approx(ref_metrics["ratio_min"], rel=1e-9)
    assert metrics["probs_ratio_max"] == pytest.approx(ref_metrics["ratio_max"], rel=1e-9)
    assert metrics["dppo_mismatch_kl_k3"] == pytest.approx(ref_metrics["mismatch_kl_k3"], rel=1e-6, abs=1e-9)
    assert metrics["dppo_abs_prob_diff"] == pytest.approx(ref_metrics["abs_prob_diff_mean"], rel=1e-6)
    assert metrics["num_valid_samples"] == float(batch.data[keys.SAMPLE_MASK].sum())
    mask = batch.data[keys.TOKEN_MASK][:, 1:].bool() & batch.data[keys.SAMPLE_MASK][:, None].bool()
    n_pos = float((mask & (batch.data[keys.ADVANTAGES][:, 1:] > 0)).sum())
    expected_pos = ref_metrics["mask_frac_pos"] * n_pos / float(mask.sum())
    assert metrics["dppo_masked_pos_frac"] == pytest.approx(expected_pos, abs=1e-6)
    # A = 0 tokens may be masked too (Eq. 12 puts them in the A ≤ 0 branch): they are in neither signed bucket
    assert metrics["dppo_masked_pos_frac"] + metrics["dppo_masked_neg_frac"] <= metrics["dppo_mask_frac"] + 1e-9
    return metrics


# --- the loss against the loss core --------------------------------------------------------------------------------


#: Every mode through every call form it can take (Top-K modes need logits, so no LOGPROB call).
MODE_API = [
    (m, api) for m in ALL_MODES for api in ("logprob", "logit", "v0.5") if api != "logprob" or m in BINARY_MODES
]


@pytest.mark.parametrize(("mode", "api"), MODE_API)
def test_microbatch_sum_equals_whole_batch_loss_core(mode: str, api: str) -> None:
    loss_fn = DPPOLossFn({"mode": mode, "ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "topk": K})
    batch = make_batch(seed=len(mode))
    metrics = check_against_reference(loss_fn, batch, micro_batch=3, api=api)
    if mode.startswith("dppo") or mode in ("ppo_clip", "minirl"):
        assert 0 < metrics["dppo_mask_frac"] < 1, "the batch should exercise both kept and masked tokens"


@pytest.mark.parametrize(
    ("section", "agg"),
    [
        ({"token_level_loss": True}, "token-mean"),
        ({"token_level_loss": False}, "seq-mean-token-mean"),
        ({"agg": "seq-mean-token-sum", "token_level_loss": False}, "seq-mean-token-sum"),
        ({"agg": "seq-mean-token-sum-norm", "max_response_len": 16}, "seq-mean-token-sum-norm"),
    ],
)
@pytest.mark.parametrize("micro_batch", [1, 4, 7])
def test_every_aggregation_sums_over_microbatches(section: dict, agg: str, micro_batch: int) -> None:
    loss_fn = DPPOLossFn({"mode": "dppo_binary_kl", **section})
    assert loss_fn.cfg.agg == agg
    assert loss_fn.loss_type == (LossType.TOKEN_LEVEL if agg == "token-mean" else LossType.SEQUENCE_LEVEL)
    check_against_reference(loss_fn, make_batch(seed=micro_batch), micro_batch=micro_batch, api="logprob")


def test_fp32_inputs_like_nemo_rl_within_fp32_rounding() -> None:
    loss_fn = DPPOLossFn({"mode": "dppo_topk_tv", "topk": K})
    check_against_reference(loss_fn, make_batch(seed=3, dtype=torch.float32), micro_batch=2, api="logit", tol=2e-5)


@pytest.mark.parametrize("mode", ["dppo_binary_tv", "dppo_topk_kl", "minirl"])
def test_sequence_packing_per_sequence_calls(mode: str) -> None:
    """`SequencePackingLossWrapper`: one call per sequence, data cut to the unpadded length, logits padded."""
    loss_fn = DPPOLossFn({"mode": mode, "topk": K})
    batch = make_batch(seed=11)
    ref_loss, _, ref_grad = whole_batch_reference(batch, loss_fn.cfg)
    data, logits = batch.data, batch.logits
    seqs, toks = global_counts(data)
    lengths = [int(row.nonzero()[-1]) + 1 for row in data[keys.TOKEN_MASK]]  # unpadded: prompt + response
    total, metrics = 0.0, []
    for i in range(len(lengths)):
        n = int(lengths[i])
        row = {k: (v[i : i + 1, :n] if v.dim() > 1 and v.shape[1] > 1 else v[i : i + 1]) for k, v in data.items()}
        padded = logits[i : i + 1]  # the packed slice keeps its padded length
        if loss_fn.input_type == LossInputType.LOGPROB:
            loss, m = loss_fn(
                data=row,
                global_valid_seqs=seqs,
                global_valid_toks=toks,
                next_token_logprobs=next_token_logprobs(padded[:, :n], row[keys.INPUT_IDS]),
            )
        else:
            loss, m = loss_fn(data=row, global_valid_seqs=seqs, global_valid_toks=toks, logits=padded)
        loss.backward()
        total += float(loss.detach())
        metrics.append(m)
    assert total == pytest.approx(float(ref_loss), abs=1e-10)
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-10, atol=1e-10)
    assert reduce_like_grpo_train(metrics)["loss"] == pytest.approx(float(ref_loss), abs=1e-10)


def test_empty_microbatch_reports_nemo_rl_sentinels() -> None:
    loss_fn = DPPOLossFn({"mode": "dppo_binary_tv"})
    batch = make_batch(seed=5)
    mb = {k: v[1:2] for k, v in batch.data.items()}  # sample 1 has sample_mask 0
    seqs, toks = global_counts(batch.data)
    lp = next_token_logprobs(batch.logits[1:2], mb[keys.INPUT_IDS])
    loss, metrics = loss_fn(data=mb, global_valid_seqs=seqs, global_valid_toks=toks, next_token_logprobs=lp)
    assert float(loss) == 0.0
    assert metrics["probs_ratio_min"] == math.inf and metrics["probs_ratio_max"] == -math.inf
    assert metrics["dppo_mask_frac"] == 0.0 and metrics["num_valid_samples"] == 0.0


def test_nemo_rl_attributes_and_metric_normalizations() -> None:
    binary, topk = DPPOLossFn({"mode": "dppo_binary_tv"}), DPPOLossFn({"mode": "dppo_topk_tv"})
    assert binary.input_type == LossInputType.LOGPROB and topk.input_type == LossInputType.LOGIT
    assert topk.topk == 20 and binary.topk == 0
    assert {m.value for m in LossType} >= {"token_level", "sequence_level"}
    assert {m.value for m in LossInputType} >= {"logit", "logprob"}
    assert {m.value for m in MetricNormalizer} == {"tokens", "sequences", "none"}
    for attribute, value in (("reference_policy_kl_penalty", 0.0), ("force_on_policy_ratio", False)):
        assert getattr(binary, attribute) == value  # read by NeMo-RL's setup / prepare_loss_input
    batch = make_batch()
    seqs, toks = global_counts(batch.data)
    lp = next_token_logprobs(batch.logits, batch.data[keys.INPUT_IDS])
    _, metrics = binary(data=batch.data, global_valid_seqs=seqs, global_valid_toks=toks, next_token_logprobs=lp)
    assert set(metrics) == set(binary.metric_normalizations)
    assert "token_mult_prob_error" in metrics  # grpo_train reads it by name after every step
    assert all("_min" not in k and "_max" not in k for k in metrics if not k.startswith("probs_ratio"))


def test_token_mult_prob_error_matches_nemo_rl_definition() -> None:
    batch = make_batch(seed=2)
    data = batch.data
    seqs, toks = global_counts(data)
    lp = next_token_logprobs(batch.logits, data[keys.INPUT_IDS])
    _, metrics = DPPOLossFn()(data=data, global_valid_seqs=seqs, global_valid_toks=toks, next_token_logprobs=lp)
    mask = data[keys.TOKEN_MASK][:, 1:] * data[keys.SAMPLE_MASK][:, None]
    gap = (data[keys.GENERATION_LOGPROBS][:, 1:] - data[keys.PREV_LOGPROBS][:, 1:]).abs()
    expected = float((torch.exp(gap * mask) * mask).sum() / (toks + 1e-8))  # NeMo-RL's masked_mean
    assert metrics["token_mult_prob_error"] == pytest.approx(expected, rel=1e-6)


def test_clear_errors_for_wrong_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch()
    seqs, toks = global_counts(batch.data)
    lp = next_token_logprobs(batch.logits, batch.data[keys.INPUT_IDS])
    with pytest.raises(TypeError, match="needs the logits"):
        DPPOLossFn({"mode": "dppo_topk_tv", "topk": K})(
            data=batch.data, global_valid_seqs=seqs, global_valid_toks=toks, next_token_logprobs=lp
        )
    without_topk = {k: v for k, v in batch.data.items() if k not in (keys.TOPK_IDS, keys.TOPK_LOGPROBS)}
    with pytest.raises(KeyError, match=r"nemo_dppo\.nemo_rl\.run"):
        DPPOLossFn({"mode": "dppo_topk_tv", "topk": K})(
            data=without_topk, global_valid_seqs=seqs, global_valid_toks=toks, logits=batch.logits
        )
    with pytest.raises(ValueError, match=r"K=4 but loss_fn\.topk=20"):
        DPPOLossFn({"mode": "dppo_topk_tv"})(
            data=batch.data, global_valid_seqs=seqs, global_valid_toks=toks, logits=batch.logits
        )
    with pytest.raises(TypeError, match="exactly one"):
        DPPOLossFn()(data=batch.data, global_valid_seqs=seqs, global_valid_toks=toks)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(UnsupportedParallelism, match="context_parallel_size=1"):
        DPPOLossFn()(batch.logits, batch.data, seqs, toks, context_parallel_group=object())


def test_picklable_and_importable_without_config_libraries() -> None:
    """NeMo-RL pickles the loss to its Megatron workers, whose venv has torch but maybe no omegaconf / hydra / ray.

    The pickle holds the settings only (no reference to NeMo-RL's enums, which import ray and transformers), so it
    loads where none of those import, whether or not nemo_rl is importable in the pickling process."""
    loss_fn = DPPOLossFn({"mode": "dppo_topk_kl", "topk": 8, "token_level_loss": False})
    payload = pickle.dumps(loss_fn)
    clone = pickle.loads(payload)
    assert clone.cfg == loss_fn.cfg and clone.loss_type == loss_fn.loss_type and clone.topk == 8
    assert clone.input_type == loss_fn.input_type and clone.metric_normalizations == loss_fn.metric_normalizations
    assert b"nemo_rl.algorithms" not in payload
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('omegaconf', 'hydra', 'ray', 'yaml', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pickle, nemo_dppo.nemo_rl.loss as m\n"
        "fn = pickle.loads(sys.stdin.buffer.read())\n"
        "print(type(fn).__name__, fn.cfg.mode, fn.loss_type.value)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], input=payload, capture_output=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["DPPOLossFn", "dppo_topk_kl", "sequence_level"]


# --- v0.5 with TP = 2 vocabulary-parallel logits over gloo --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        for mode in ("dppo_binary_tv", "dppo_topk_kl", "dppo_binary_kl_decoupled"):
            loss_fn = DPPOLossFn({"mode": mode, "topk": K})
            full = make_batch(seed=21)  # identical on both ranks
            ref_loss, _, ref_grad = whole_batch_reference(full, loss_fn.cfg)
            width = VOCAB // world
            shard = full.logits.detach()[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
            total, metrics = run_microbatches(loss_fn, Batch(full.data, shard), micro_batch=3, api="v0.5", group=group)
            assert total == pytest.approx(float(ref_loss), abs=1e-10), mode
            torch.testing.assert_close(shard.grad, ref_grad[..., rank * width : (rank + 1) * width], rtol=0, atol=1e-10)
            assert metrics["loss"] == pytest.approx(float(ref_loss), abs=1e-10)
    finally:
        dist.destroy_process_group()


def test_v05_api_tensor_parallel_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """v0.5 passes each TP rank its [B, S, V/2] shard and the TP group; losses and shard gradients are exact."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_tp_worker, args=(2,), nprocs=2, join=True)


# --- loss_fn section mapping -----------------------------------------------------------------------------------------


def test_nemo_rl_clipped_pg_keys_map_onto_loss_config() -> None:
    s = loss_settings(
        {
            "mode": "ppo_clip",
            "ratio_clip_min": 0.1,
            "ratio_clip_max": 0.3,
            "ratio_clip_c": 3.0,
            "token_level_loss": False,
            "use_importance_sampling_correction": True,
            "truncated_importance_sampling_type": "tis",
            "truncated_importance_sampling_ratio": 2.0,
            "reference_policy_kl_penalty": 0.0,
        }
    )
    assert (s.core.clip_low, s.core.clip_high, s.core.dual_clip) == (0.1, 0.3, 3.0)
    assert s.core.agg == "seq-mean-token-mean" and not s.token_level
    assert s.core.ratio_cap == 2.0
    assert loss_settings({"use_cispo": True}).core.mode == "cispo"
    assert loss_settings({"agg": "seq-mean-token-sum-norm"}, max_new_tokens=8192).core.max_response_len == 8192
    assert loss_settings({"mode": "dppo_binary_kl"}).core.deltas("kl") == (0.05, 0.05)


class _PydanticLike:
    """NeMo-RL ≥ 0.7's `master_config.loss_fn` is a pydantic model (extra keys allowed)."""

    def model_dump(self) -> dict:
        return {"ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "mode": "dppo_binary_kl", "delta_low": 0.07}


def test_accepts_pydantic_and_omegaconf_sections() -> None:
    from omegaconf import OmegaConf

    assert loss_settings(_PydanticLike()).core.delta_low == 0.07
    assert loss_settings(OmegaConf.create({"mode": "cispo", "ratio_clip_max": 0.3})).core.clip_high == 0.3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"modee": "dppo_binary_tv"}, "did you mean 'mode'"),
        ({"mode": "dppo"}, "valid modes:"),
        ({"reference_policy_kl_penalty": 0.01}, "reference_policy_kl_penalty=0.01 is not supported"),
        ({"disable_ppo_ratio": True}, "disable_ppo_ratio=True is not supported"),
        ({"force_on_policy_ratio": True}, "force_on_policy_ratio"),
        ({"sequence_level_importance_ratios": True}, "sequence_level_importance_ratios"),
        ({"truncated_importance_sampling_type": "icepop"}, "icepop"),
        ({"clip_low": 0.3, "ratio_clip_min": 0.2}, "both set clip_low"),
        ({"use_cispo": True, "mode": "dppo_binary_tv"}, "both set mode"),
        ({"agg": "token-mean", "token_level_loss": False}, "needs loss_fn.token_level_loss=true"),
        ({"agg": "seq-mean-token-sum-norm"}, "needs loss_fn.max_response_len"),
        ({"mode": "dppo_topk_tv", "topk": 0}, "topk=0 must be ≥ 1"),
        ({"delta_low": -1.0}, "loss_fn.delta_low=-1.0 must be > 0"),
    ],
)
def test_unsupported_or_inconsistent_sections_fail_with_one_line(section: dict, message: str) -> None:
    with pytest.raises(LossSettingsError, match=None) as error:
        loss_settings(section)
    assert message in str(error.value) and "\n" not in str(error.value)


# --- vLLM Top-K log-probs → data keys ---------------------------------------------------------------------------------


@dataclass
class FakeLogprob:
    """vLLM's `Logprob` (logprob, rank, decoded_token)."""

    logprob: float
    rank: int | None = None


def test_topk_from_vllm_dict_swaps_sampled_token_into_slot_k() -> None:
    entries = {5: FakeLogprob(-0.1, 1), 9: FakeLogprob(-2.0, 2), 2: FakeLogprob(-3.0, 3)}
    assert topk_with_sampled(entries, 9, 3) == ([5, 9, 2], [-0.1, -2.0, -3.0])
    entries[7] = FakeLogprob(-6.0, 40)  # sampled outside the top-3: vLLM adds it as a 4th entry
    assert topk_with_sampled(entries, 7, 3) == ([5, 9, 7], [-0.1, -2.0, -6.0])
    entries[8] = FakeLogprob(-math.inf, 41)
    assert topk_with_sampled({1: FakeLogprob(0.0, 1), 8: entries[8]}, 1, 2)[1] == [0.0, LOGPROB_FLOOR]
    with pytest.raises(ValueError, match="fewer than K=3"):
        topk_with_sampled({1: FakeLogprob(-0.5, 1)}, 1, 3)


def test_batch_topk_uses_nemo_rl_logprobs_layout() -> None:
    """Column `input_lengths[i] + j` holds generated token j, exactly where NeMo-RL's worker puts its logprob."""
    g = torch.Generator().manual_seed(0)
    input_lengths, padded_input = [3, 5], 6
    outputs = []
    for n in (4, 2):
        token_ids, steps = [], []
        for _ in range(n):
            lp = torch.log_softmax(torch.randn(12, generator=g), -1)
            sampled = int(torch.multinomial(lp.exp(), 1, generator=g))
            order = lp.argsort(descending=True).tolist()
            entries = {t: FakeLogprob(float(lp[t]), order.index(t) + 1) for t in order[:K]}
            entries[sampled] = FakeLogprob(float(lp[sampled]), order.index(sampled) + 1)
            token_ids.append(sampled)
            steps.append(entries)
        outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=token_ids, logprobs=steps)]))
    ids, logprobs = batch_topk(outputs, input_lengths, padded_input, K)
    assert ids.shape == (2, padded_input + 4, K) and ids.dtype == torch.long and logprobs.dtype == torch.float32
    for i, output in enumerate(outputs):
        completion = output.outputs[0]
        nemo_rl_logprobs = torch.zeros(padded_input + 4)  # the worker's own loop: full_logprobs[len + idx]
        for idx, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            nemo_rl_logprobs[input_lengths[i] + idx] = entry[token].logprob
        for idx, token in enumerate(completion.token_ids):
            col = input_lengths[i] + idx
            slot = (ids[i, col] == token).nonzero()
            assert len(slot) == 1, "the sampled id is always among the K"
            assert float(logprobs[i, col, slot[0, 0]]) == pytest.approx(float(nemo_rl_logprobs[col]))
        untouched = torch.ones(padded_input + 4, dtype=torch.bool)
        untouched[input_lengths[i] : input_lengths[i] + len(completion.token_ids)] = False
        assert not ids[i, untouched].any() and not logprobs[i, untouched].any()


def test_message_log_plumbing_carries_topk_into_an_aligned_training_batch() -> None:
    """Generation outputs → assistant messages → backfill → NeMo-RL-style flattening → train_data → the loss."""
    batch = make_batch(seed=8, batch=3)
    data = batch.data
    prompt_lengths = [int(data[keys.TOKEN_MASK][i].nonzero()[0]) for i in range(3)]
    ends = [int(data[keys.TOKEN_MASK][i].nonzero()[-1]) + 1 for i in range(3)]
    logs = [[{"role": "user", "token_ids": data[keys.INPUT_IDS][i, : prompt_lengths[i]]}] for i in range(3)]
    for i, log in enumerate(logs):  # what generate_responses appends
        log.append(
            {
                "role": "assistant",
                "token_ids": data[keys.INPUT_IDS][i, prompt_lengths[i] : ends[i]],
                "generation_logprobs": data[keys.GENERATION_LOGPROBS][i, prompt_lengths[i] : ends[i]],
            }
        )
    outputs = {
        keys.TOPK_IDS: data[keys.TOPK_IDS],
        keys.TOPK_LOGPROBS: data[keys.TOPK_LOGPROBS],
        "unpadded_sequence_lengths": torch.tensor(ends),
    }
    attach_topk_to_responses(logs, outputs, prompt_lengths)
    backfill_topk(logs, K)
    seq = data[keys.INPUT_IDS].shape[1]

    def flat(key: str) -> torch.Tensor:  # batched_message_log_to_flat_message: concat messages, right-pad with 0
        rows = [torch.cat([m[key] for m in log]) for log in logs]
        return torch.stack([torch.nn.functional.pad(r, (0, 0) * (r.dim() - 1) + (0, seq - len(r))) for r in rows])

    flat_messages = {keys.TOPK_IDS: flat(keys.TOPK_IDS), keys.TOPK_LOGPROBS: flat(keys.TOPK_LOGPROBS)}
    train_data = {keys.GENERATION_LOGPROBS: data[keys.GENERATION_LOGPROBS]}
    logprob_data: dict = {}
    copy_topk_keys(train_data, flat_messages)
    copy_topk_keys(logprob_data, flat_messages)
    assert not logprob_data, "only the training batch (with generation_logprobs) gets the Top-K keys"
    response = data[keys.TOKEN_MASK].bool()[..., None]
    torch.testing.assert_close(torch.where(response, train_data[keys.TOPK_IDS], 0), data[keys.TOPK_IDS])
    torch.testing.assert_close(torch.where(response, train_data[keys.TOPK_LOGPROBS], 0), data[keys.TOPK_LOGPROBS])


def _stub_module(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def test_install_topk_plumbing_wraps_nemo_rl_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against stand-ins with the v0.7 names and signatures of the hooks (nemo_rl is not importable here)."""
    nemo_fqn = "nemo_rl.models.generation.vllm.vllm_worker.VllmGenerationWorker"
    registry = {nemo_fqn: "/venvs/vllm/bin/python"}
    calls: list[str] = []

    def generate_responses(
        policy_generation, generation_input_data, batch, tokenizer, input_lengths, include_logprobs=True, greedy=False
    ):
        out = policy_generation.generate(generation_input_data, greedy=greedy)
        for i, log in enumerate(batch["message_log"]):
            log.append({"role": "assistant", "token_ids": out["output_ids"][i, int(input_lengths[i]) :]})
        return batch, [], {}

    def add_masks(message_logs):
        calls.append("add_masks")
        assert all(keys.TOPK_IDS in m for log in message_logs for m in log), "backfill must run first"

    def preserve(target, flat_messages, policy_config):
        calls.append("preserve")

    stubs = {
        "nemo_rl": _stub_module("nemo_rl"),
        "nemo_rl.distributed.ray_actor_environment_registry": _stub_module("r", ACTOR_ENVIRONMENT_REGISTRY=registry),
        "nemo_rl.models.generation.vllm.vllm_generation": _stub_module(
            "g", resolve_generation_worker_cls=lambda default_cls, config: default_cls
        ),
        "nemo_rl.experience.rollouts": _stub_module("ro", generate_responses=generate_responses),
        "nemo_rl.algorithms.grpo": _stub_module(
            "grpo",
            add_grpo_token_loss_masks_and_generation_logprobs=add_masks,
            _preserve_router_replay_routed_experts=preserve,
        ),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(TOPK_ENV, raising=False)
    install_topk_plumbing(3)
    install_topk_plumbing(3)  # idempotent
    assert os.environ[TOPK_ENV] == "3"
    assert registry[TOPK_WORKER_FQN] == registry[nemo_fqn]
    generation = stubs["nemo_rl.models.generation.vllm.vllm_generation"]
    assert generation.resolve_generation_worker_cls(nemo_fqn, {}) == TOPK_WORKER_FQN
    assert generation.resolve_generation_worker_cls("other.Worker", {}) == "other.Worker"

    ids = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    fake_generation = types.SimpleNamespace(
        generate=lambda data, greedy=False: {
            "output_ids": torch.ones(2, 6, dtype=torch.long),
            "unpadded_sequence_lengths": torch.tensor([6, 5]),
            keys.TOPK_IDS: ids,
            keys.TOPK_LOGPROBS: -ids.float(),
        }
    )
    batch = {
        "message_log": [[{"role": "user", "token_ids": torch.ones(2)}], [{"role": "user", "token_ids": torch.ones(4)}]]
    }
    stubs["nemo_rl.experience.rollouts"].generate_responses(fake_generation, {}, batch, None, torch.tensor([2, 4]))
    torch.testing.assert_close(batch["message_log"][0][-1][keys.TOPK_IDS], ids[0, 2:6])
    torch.testing.assert_close(batch["message_log"][1][-1][keys.TOPK_IDS], ids[1, 4:5])
    grpo = stubs["nemo_rl.algorithms.grpo"]
    grpo.add_grpo_token_loss_masks_and_generation_logprobs(batch["message_log"])
    assert batch["message_log"][0][0][keys.TOPK_IDS].shape == (2, 3)  # backfilled prompt
    train_data = {keys.GENERATION_LOGPROBS: torch.zeros(2, 6)}
    grpo._preserve_router_replay_routed_experts(train_data, {keys.TOPK_IDS: ids, keys.TOPK_LOGPROBS: -ids}, {})
    assert calls == ["add_masks", "preserve"] and keys.TOPK_IDS in train_data


def test_vllm_worker_subclass_requests_k_logprobs_and_returns_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nemo_dppo.nemo_rl.launch.vllm_worker` on a stand-in for NeMo-RL's v0.7 worker (same method names and layout)."""
    pytest.importorskip("ray", reason="the worker module wraps its class with ray.remote")

    class VllmGenerationWorkerImpl:  # NeMo-RL's `_build_sampling_params` / `generate` contract
        def __init__(self, llm: object) -> None:
            self.llm = llm

        def _build_sampling_params(self, *, greedy: bool, stop_strings: object, max_new_tokens: int | None = None):
            return types.SimpleNamespace(logprobs=0, greedy=greedy)

        def generate(self, data: dict, greedy: bool = False) -> dict:
            params = self._build_sampling_params(greedy=greedy, stop_strings=None)
            outputs = self.llm.generate(data["input_ids"].tolist(), params, use_tqdm=False)
            width = data["input_ids"].shape[1] + max(len(o.outputs[0].token_ids) for o in outputs)
            logprobs = torch.zeros(len(outputs), width)
            for i, output in enumerate(outputs):
                completion = output.outputs[0]
                for idx, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
                    logprobs[i, int(data["input_lengths"][i]) + idx] = entry[token].logprob
            return {"logprobs": logprobs}

    class FakeLLM:
        def generate(self, prompts: list, params: object, use_tqdm: bool = True) -> list:
            self.params = params
            steps = [{7: FakeLogprob(-0.2, 1), 3: FakeLogprob(-1.9, 2), 5: FakeLogprob(-4.0, 9)}]
            completion = types.SimpleNamespace(token_ids=[5], logprobs=steps)
            return [types.SimpleNamespace(outputs=[completion]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "nemo_rl", _stub_module("nemo_rl"))
    monkeypatch.setitem(
        sys.modules,
        "nemo_rl.models.generation.vllm.vllm_worker",
        _stub_module("w", VllmGenerationWorkerImpl=VllmGenerationWorkerImpl),
    )
    monkeypatch.setenv(TOPK_ENV, "2")
    sys.modules.pop("nemo_dppo.nemo_rl.launch.vllm_worker", None)
    try:
        vllm_worker = importlib.import_module("nemo_dppo.nemo_rl.launch.vllm_worker")
    finally:
        sys.modules.pop("nemo_dppo.nemo_rl.launch.vllm_worker", None)  # built on the stand-in: never reuse it

    llm = FakeLLM()
    worker = vllm_worker.TopKVllmGenerationWorkerImpl(llm)
    data = {"input_ids": torch.ones(2, 3, dtype=torch.long), "input_lengths": torch.tensor([3, 2])}
    result = worker.generate(data)
    assert llm.params.logprobs == 2 and "generate" not in vars(llm), "logprobs=K requested, llm restored"
    assert result[keys.TOPK_IDS].shape == (2, 4, 2)
    assert result[keys.TOPK_IDS][0, 3].tolist() == [7, 5] and result[keys.TOPK_IDS][1, 2].tolist() == [7, 5]
    assert result[keys.TOPK_LOGPROBS][0, 3].tolist() == pytest.approx([-0.2, -4.0])
    assert float(result["logprobs"][0, 3]) == pytest.approx(-4.0)  # NeMo-RL's own output is unchanged


def test_install_topk_plumbing_needs_nemo_rl_07(monkeypatch: pytest.MonkeyPatch) -> None:
    from nemo_dppo.nemo_rl.launch.topk_plumbing import PlumbingError

    monkeypatch.setitem(sys.modules, "nemo_rl.distributed.ray_actor_environment_registry", _stub_module("r"))
    with pytest.raises(PlumbingError, match=r"NeMo-RL ≥ 0\.7"):
        install_topk_plumbing(20)


# --- the run entry point ----------------------------------------------------------------------------------------------


def test_run_without_nemo_rl_prints_one_install_line() -> None:
    if NEMO_RL_IMPORTABLE:
        pytest.skip("nemo_rl is importable here")
    recipe = REPO / "conf" / "nemo_rl" / "qwen3_30b_a3b_base.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dppo.nemo_rl.run", str(recipe), "loss_fn.mode=dppo_binary_kl"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: NeMo-RL is not installed"), result.stderr
    assert "nvcr.io/nvidia/nemo-rl" in lines[0] and "github.com/NVIDIA-NeMo/RL" in lines[0]


def test_run_swaps_the_loss_and_calls_grpo_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The v0.7 driver sequence against stand-ins with NeMo-RL's names, signatures and 13-value `setup` result."""
    from omegaconf import OmegaConf

    from nemo_dppo.nemo_rl.launch import run
    from nemo_dppo.nemo_rl.recipes.recipe_loading import apply_overrides, load_recipe

    seen: dict[str, object] = {}

    class ClippedPGLossFn:
        pass

    class MasterConfig:
        model_validate = classmethod(lambda cls, x: cls(**x))

        def __init__(self, **sections: object) -> None:
            self.__dict__.update(sections)

    def setup(master, tokenizer, dataset, val_dataset, processor=None, policy_factory=None):
        seen["master"] = master
        loss = ClippedPGLossFn()
        return (
            "policy",
            "generation",
            None,
            "cluster",
            "dl",
            "val_dl",
            loss,
            "logger",
            "ckpt",
            "state",
            master,
            {},
            {},
        )

    def grpo_train(*args):
        seen["train_args"] = args

    def load_config(path):
        return load_recipe(path)

    def parse_hydra_overrides(cfg, overrides):
        apply_overrides(cfg, overrides)
        return cfg

    grpo = _stub_module("nemo_rl.algorithms.grpo", MasterConfig=MasterConfig, setup=setup, grpo_train=grpo_train)
    stubs = {
        "nemo_rl": _stub_module("nemo_rl"),
        "nemo_rl.algorithms.grpo": grpo,
        "nemo_rl.utils.config": _stub_module("c", load_config=load_config, parse_hydra_overrides=parse_hydra_overrides),
        "nemo_rl.utils.logger": _stub_module("l", get_next_experiment_dir=lambda d: f"{d}/exp_001"),
        "nemo_rl.distributed.virtual_cluster": _stub_module("v", init_ray=lambda: seen.setdefault("ray", True)),
        "nemo_rl.algorithms.utils": _stub_module("u", get_tokenizer=lambda cfg: f"tok:{cfg['name']}"),
        "nemo_rl.models.generation": _stub_module(
            "gen", configure_generation_config=lambda cfg, tok, has_refit_draft_weights=False, trains_mtp=False: cfg
        ),
        "nemo_rl.data.utils": _stub_module(
            "d", setup_response_data=lambda tok, data, env: ("ds", "val_ds", {"math": "env"}, {"math": "env"})
        ),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    recipe = REPO / "conf" / "nemo_rl" / "qwen3_30b_a3b_base.yaml"
    assert run.main([str(recipe), "loss_fn.mode=dppo_binary_kl", "grpo.max_num_steps=3"]) == 0
    args = seen["train_args"]
    assert isinstance(args[5], DPPOLossFn) and args[5].cfg.mode == "dppo_binary_kl"
    assert args[:5] == ("policy", "generation", "dl", "val_dl", "tok:Qwen/Qwen3-30B-A3B-Base")
    assert args[8:] == ("logger", "ckpt", "state", seen["master"])
    master = seen["master"]
    assert master.grpo["max_num_steps"] == 3 and master.logger["log_dir"].endswith("/exp_001")
    assert OmegaConf.is_config(master.policy) is False and seen["ray"] is True


# --- the same invariant through NeMo-RL's own code, when it is installed ------------------------------------------


@pytest.mark.skipif(
    not NEMO_RL_IMPORTABLE,
    reason="NeMo-RL is not installed (not on PyPI: its container or a git checkout); the tests above reproduce its "
    "calling convention from its source",
)
@pytest.mark.nemo_rl_real
class TestRealNemoRL:
    """`prepare_loss_input` + `wrap_loss_fn_with_input_preparation` (v0.6+) and `BatchedDataDict` micro-batches."""

    @pytest.fixture(autouse=True)
    def _cuda_noop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        if not torch.cuda.is_available():  # NeMo-RL's non-parallel log-prob path moves token ids to CUDA once
            monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)

    @pytest.mark.parametrize("mode", ["dppo_binary_tv", "dppo_topk_tv", "minirl"])
    def test_nemo_rl_wrappers_sum_to_the_loss_core(self, mode: str) -> None:
        loss_module = pytest.importorskip("nemo_rl.algorithms.loss", reason="NeMo-RL < 0.6 has no loss package")
        from nemo_rl.distributed.batched_data_dict import BatchedDataDict

        loss_fn = DPPOLossFn({"mode": mode, "topk": K})
        batch = make_batch(seed=4, dtype=torch.float32)
        ref_loss, _, ref_grad = whole_batch_reference(batch, loss_fn.cfg)
        data = BatchedDataDict({k: v.cuda() for k, v in batch.data.items()})
        logits = batch.logits.detach().cuda().requires_grad_(True)
        seqs, toks = global_counts(data)
        total, metrics = 0.0, []
        for start in range(0, logits.shape[0], 3):
            mb = data.slice(start, min(start + 3, logits.shape[0]))
            loss, m = loss_module.wrap_loss_fn_with_input_preparation(
                logits[start : start + 3], mb, seqs, toks, loss_fn=loss_fn, prepare_fn=loss_module.prepare_loss_input
            )
            loss.backward()
            total += float(loss.detach())
            metrics.append(m)
        assert total == pytest.approx(float(ref_loss), rel=2e-5, abs=2e-6)
        torch.testing.assert_close(logits.grad.cpu(), ref_grad.float(), rtol=2e-5, atol=2e-6)
        assert reduce_like_grpo_train(metrics)["loss"] == pytest.approx(float(ref_loss), rel=2e-5, abs=2e-6)

    def test_enums_are_nemo_rls(self) -> None:
        interfaces = pytest.importorskip("nemo_rl.algorithms.loss.interfaces")
        assert LossType is interfaces.LossType and LossInputType is interfaces.LossInputType
