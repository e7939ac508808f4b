"""The `nemo_rl_real` tier: `DPPOLossFn` inside NeMo-RL's own code (`pytest -m nemo_rl_real`).

Runs wherever `nemo_rl` is importable (NeMo-RL's container, or a NeMo-RL checkout on PYTHONPATH); skips with one line
elsewhere. Without CUDA a fixture makes `torch.Tensor.cuda` a no-op (NeMo-RL's log-prob path calls it once).

- Gradient parity: `DPPOLossFn` and NeMo-RL's `ClippedPGLossFn` on a batch built like NeMo-RL's loss tests
  (`_setup_clipped_pg_test_data`'s keys), each through NeMo-RL's `prepare_loss_input` /
  `wrap_loss_fn_with_input_preparation` over `BatchedDataDict.slice` micro-batches, with the same `loss_fn:` section.
  Where the objectives are the same the gradients are equal; the loss values differ by a predicted amount (NeMo-RL
  gives a clipped token the constant −A·clip(r), DPPO gives it 0; CISPO's value is −A·w·log π vs DPPO's −A·w).
- NeMo-RL's real `grpo_train` for 3 steps with NeMo-RL's own mocks (as `tests/unit/algorithms/test_grpo.py` builds
  them: MagicMock generation, patched rollout, mocked environments, logger, checkpointer) and a CPU policy whose
  `train` runs the loss on the training batch `grpo_train` built, for every `loss_fn.mode`, R3 on and off.
- The metric keys NeMo-RL's loops read (`tests/test_nemo_rl_loop_keys.py`) are checked against its source.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock, patch

import pytest
import torch

from nemo_dppo.losses import LOSS_MODES, get_mode
from nemo_dppo.nemo_rl.launch.topk_plumbing import install_topk_plumbing
from nemo_dppo.nemo_rl.loss import DPPOLossFn
from tests.test_nemo_rl_loop_keys import LOOP_READS, NOT_FROM_THE_LOSS, REDUCED_BY_EXTREMUM


def _import_or_skip(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:  # NeMo-RL fails to import in many ways (missing package, Python < 3.12, ...)
        reason = " ".join(str(error).split())[:160]
        pytest.skip(f"{name} is not importable ({type(error).__name__}: {reason})", allow_module_level=True)


pytestmark = pytest.mark.nemo_rl_real
_import_or_skip("nemo_rl")
loss_pkg = _import_or_skip("nemo_rl.algorithms.loss")
grpo_mod = _import_or_skip("nemo_rl.algorithms.grpo")
from nemo_rl.distributed.batched_data_dict import BatchedDataDict  # noqa: E402

NEMO_RL_ROOT = Path(importlib.import_module("nemo_rl").__file__).resolve().parent.parent
VOCAB, SEQ, BATCH, K = 16, 9, 6, 4


@pytest.fixture(autouse=True)
def _cuda_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


# --- gradient parity with ClippedPGLossFn ---------------------------------------------------------------------------


def clipped_pg_batch(seed: int, on_policy: bool) -> tuple[Any, torch.Tensor]:
    """NeMo-RL's loss-test batch (same keys; first token masked), with values spread over the clip range."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=g) * 1.5).requires_grad_(True)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    token_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    token_mask[:, 0] = 0
    token_mask[0, 6:] = 0  # a shorter response
    sample_mask = torch.ones(BATCH, dtype=torch.int64)
    sample_mask[3] = 0
    advantages = (torch.randn(BATCH, 1, generator=g) * 1.5).expand(BATCH, SEQ).contiguous()

    def logprobs(noise: float) -> torch.Tensor:
        other = logits.detach() + torch.randn(BATCH, SEQ, VOCAB, generator=g) * noise
        lp = torch.log_softmax(other[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(BATCH, 1), lp], dim=1)

    generation = logprobs(0.8)
    data = BatchedDataDict(
        {
            "input_ids": input_ids,
            "token_mask": token_mask,
            "sample_mask": sample_mask,
            "advantages": advantages,
            "prev_logprobs": generation.clone() if on_policy else logprobs(0.5),
            "reference_policy_logprobs": torch.zeros(BATCH, SEQ),
            "generation_logprobs": generation,
        }
    )
    return data, logits


def run_nemo_rl_microbatches(loss_fn: Any, data: Any, logits: torch.Tensor, micro: int = 2) -> tuple[float, Any]:
    """NeMo-RL's worker loop: global counts, `BatchedDataDict.slice` micro-batches through its input preparation."""
    leaf = logits.detach().clone().requires_grad_(True)
    seqs = data["sample_mask"].sum()
    toks = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).sum()
    total = 0.0
    for start in range(0, BATCH, micro):
        mb = data.slice(start, start + micro)
        loss, _ = loss_pkg.wrap_loss_fn_with_input_preparation(
            leaf[start : start + micro], mb, seqs, toks, loss_fn=loss_fn, prepare_fn=loss_pkg.prepare_loss_input
        )
        loss.backward()
        total += float(loss.detach())
    return total, leaf.grad


def predicted_gap(case: str, section: dict[str, Any], data: Any, logits: torch.Tensor) -> float:
    """NeMo-RL loss − DPPO loss from the raw tensors (float64): the clipped tokens' constants (CISPO: log π)."""
    ids = data["input_ids"]
    log_pi = torch.log_softmax(logits.detach().double()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    prev = data["prev_logprobs"][:, 1:].double()
    adv = data["advantages"][:, 1:].double()
    mask = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).double()
    lo, hi, c = 1 - section["ratio_clip_min"], 1 + section["ratio_clip_max"], section.get("ratio_clip_c")
    ratio = torch.exp(log_pi - prev)
    clamped = ratio.clamp(lo, hi)
    if case == "cispo":
        per_token = -adv * clamped * (log_pi - 1)
    else:
        clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
        per_token = torch.where(clipped, -adv * clamped, 0.0)
        if c is not None:
            per_token = torch.where((adv < 0) & (ratio > c), -adv * c, per_token)
        if section.get("use_importance_sampling_correction"):
            per_token = per_token * torch.exp(prev - data["generation_logprobs"][:, 1:].double())
    if section.get("token_level_loss", True):
        return float((per_token * mask).sum() / mask.sum())
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return float(per_seq.sum() / data["sample_mask"].sum())


NEUTRAL = {"reference_policy_kl_penalty": 0.0, "ratio_clip_min": 0.2, "ratio_clip_max": 0.2}
#: case → (DPPO mode, NeMo-RL loss_fn section, prev_logprobs = generation_logprobs?)
PARITY = {
    "ppo_clip": ("ppo_clip", {}, True),
    "clip_higher_dual_clip": ("ppo_clip", {"ratio_clip_max": 0.28, "ratio_clip_c": 3.0}, True),
    "sequence_level": ("ppo_clip", {"token_level_loss": False}, True),
    "cispo": ("cispo", {"use_cispo": True, "ratio_clip_max": 0.28}, True),
    "minirl_vs_is_correction": ("minirl", {"use_importance_sampling_correction": True}, False),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_gradients_equal_clipped_pg_and_loss_gap_is_predicted(case: str) -> None:
    mode, extra, on_policy = PARITY[case]
    section = {**NEUTRAL, **extra}
    nemo_loss = loss_pkg.ClippedPGLossFn(loss_pkg.ClippedPGLossConfig(**section))
    ours = {k: v for k, v in section.items() if k != "use_cispo"}
    dppo_loss = DPPOLossFn({**ours, "mode": mode})
    data, logits = clipped_pg_batch(seed=sorted(PARITY).index(case), on_policy=on_policy)
    nemo_total, nemo_grad = run_nemo_rl_microbatches(nemo_loss, data, logits)
    dppo_total, dppo_grad = run_nemo_rl_microbatches(dppo_loss, data, logits)
    grad_gap = float((nemo_grad - dppo_grad).abs().max())
    gap, expected = nemo_total - dppo_total, predicted_gap(case, section, data, logits)
    print(f"\nparity {case}: mode={mode} max|Δgrad|={grad_gap:.2e} gap measured={gap:.6f} predicted={expected:.6f}")
    assert float(nemo_grad.abs().max()) > 1e-3  # the comparison is not between two zero gradients
    assert grad_gap < 1e-6
    assert gap == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if case != "sequence_level":
        assert abs(gap) > 1e-4  # some tokens were clipped: the values really differ


# --- NeMo-RL's grpo_train with a CPU policy running DPPOLossFn --------------------------------------------------------

LAYERS, TOP = 2, 2  # R3 routes: [tokens, layers, experts per token]


class CPUPolicy:
    """The policy `grpo_train` drives, on CPU: a tiny bigram LM; `train` runs the loss on the batch it is given,
    micro-batched through NeMo-RL's input preparation, then one AdamW step (as NeMo-RL's workers do)."""

    def __init__(self, router_replay: bool) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Embedding(VOCAB, VOCAB)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.router_replay = router_replay
        self.batches: list[dict[str, torch.Tensor]] = []

    def _logprobs(self, data: Any) -> torch.Tensor:
        ids = data["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(self.model(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)

    def get_logprobs(self, data: Any, **_: Any) -> dict[str, torch.Tensor]:
        assert ("routed_experts" in data) == self.router_replay  # R3: the recompute forward gets the routes
        return {"logprobs": self._logprobs(data)}

    def get_reference_policy_logprobs(self, data: Any, **_: Any) -> dict[str, torch.Tensor]:
        return {"reference_logprobs": self._logprobs(data)}

    def train(self, data: Any, loss_fn: Any, **_: Any) -> dict[str, Any]:
        assert ("routed_experts" in data) == self.router_replay
        self.batches.append(dict(data))
        seqs = data["sample_mask"].sum()
        toks = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).sum()
        metrics: dict[str, list[float]] = {}
        self.optimizer.zero_grad()
        for start in range(0, data["input_ids"].shape[0], 2):
            mb = data.slice(start, start + 2)
            logits = self.model(mb["input_ids"])
            loss, m = loss_pkg.wrap_loss_fn_with_input_preparation(
                logits, mb, seqs, toks, loss_fn=loss_fn, prepare_fn=loss_pkg.prepare_loss_input
            )
            loss.backward()
            m["global_valid_toks"] = float(toks)  # added by NeMo-RL's worker after each loss call
            for name, value in m.items():
                metrics.setdefault(name, []).append(value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return {"loss": torch.tensor(sum(metrics["loss"])), "grad_norm": grad_norm, "all_mb_metrics": metrics}


def rollout_batch(step: int, topk: bool, router_replay: bool) -> Any:
    """What `run_multi_turn_rollout` returns: per sample a user and an assistant message (with μ; Top-K log-probs
    and R3 routes when on), rewards ±1 within each prompt."""
    g = torch.Generator().manual_seed(100 + step)
    logs, prompts = [], [torch.randint(1, VOCAB, (3,), generator=g) for _ in range(2)]
    for sample in range(4):  # samples 0, 1 answer prompt 0; 2, 3 prompt 1 (NeMo-RL groups them by prompt tokens)
        prompt, response = prompts[sample // 2], torch.randint(1, VOCAB, (4,), generator=g)
        user: dict[str, Any] = {"role": "user", "content": "q", "token_ids": prompt}
        gen_lp = -torch.rand(4, generator=g) * 2 - 0.05
        assistant: dict[str, Any] = {"role": "assistant", "content": "a", "token_ids": response}
        assistant["generation_logprobs"] = gen_lp
        if topk:
            ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(4)])
            ids[:, -1] = response
            lps = torch.log_softmax(torch.randn(4, K, generator=g), -1) - 0.5
            lps[:, -1] = gen_lp
            assistant["generation_topk_ids"], assistant["generation_topk_logprobs"] = ids, lps
        if router_replay:
            for message, n in ((user, 3), (assistant, 4)):
                routes = [torch.randperm(8, generator=g)[:TOP] for _ in range(n * LAYERS)]
                message["routed_experts"] = torch.stack(routes).view(n, LAYERS, TOP)
        logs.append([user, assistant])
    return BatchedDataDict(
        {
            "message_log": logs,
            "task_name": ["math"] * 4,
            "extra_env_info": [{}] * 4,
            "loss_multiplier": torch.ones(4),
            "idx": torch.arange(4),
            "length": torch.full((4,), 3),  # the prompt length: NeMo-RL groups samples by their prompt
            "total_reward": torch.tensor([1.0, -1.0, -1.0, 1.0]),
            "truncated": torch.zeros(4, dtype=torch.bool),
        }
    )


def _model(class_name: str, **fields: Any) -> Any:
    """NeMo-RL main's pydantic config classes (`model_construct`, as its tests do); v0.7's plain dicts."""
    cls = getattr(grpo_mod, class_name, None)
    return cls.model_construct(**fields) if hasattr(cls, "model_construct") else fields


def master_config(mode_section: dict[str, Any], router_replay: bool, steps: int) -> Any:
    """`mock_grpo_components`' MasterConfig (NeMo-RL's tests/unit/algorithms/test_grpo.py), 2 prompts × 2 samples."""
    grpo = _model(
        "GRPOConfig",
        max_num_steps=steps, max_num_epochs=10, num_prompts_per_step=2, num_generations_per_prompt=2,
        max_rollout_turns=1, val_period=100, val_start_at=-1, val_num_generations_per_prompt=1, val_batch_size=1,
        val_at_start=False, val_at_end=False, max_val_samples=10, stop_at_validation_metric=None,
        stop_at_validation_threshold=None, seed=42, advantage_normalization="global",
        use_leave_one_out_baseline=False, normalize_rewards=False, overlong_filtering=False,
        advantage_clip_low=None, advantage_clip_high=None,
        reward_scaling=_model("RewardScalingConfig", enabled=False),
        reward_shaping=_model("RewardShapingConfig", enabled=False), use_dynamic_sampling=False,
        async_grpo=_model("AsyncGRPOConfig", enabled=False, max_trajectory_age_steps=1, max_generation_failures=0),
        seq_logprob_error_threshold=None,
        adv_estimator=_model("AdvEstimatorConfig", name="grpo", use_leave_one_out_baseline=False,
                             normalize_rewards=False),
    )  # fmt: skip
    generation = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "val_temperature": 1.0, "val_top_p": 1.0,
                  "val_top_k": None, "backend": "vllm", "colocated": {"enabled": True},
                  "vllm_cfg": {"async_engine": False}}  # fmt: skip
    policy = {"precision": "float32", "train_global_batch_size": 4, "train_micro_batch_size": 2,
              "max_total_sequence_length": 64, "make_sequence_length_divisible_by": 1, "generation": generation,
              "router_replay": {"enabled": router_replay}}  # fmt: skip
    return grpo_mod.MasterConfig.model_construct(
        grpo=grpo, policy=policy, loss_fn=loss_pkg.ClippedPGLossConfig(**mode_section),
        checkpointing={"enabled": False, "checkpoint_must_save_by": None, "save_period": 10},
        cluster={"num_nodes": 1, "gpus_per_node": 2}, logger={"num_val_samples_to_print": 5},
        data={"use_multiple_dataloader": False}, env={},
    )  # fmt: skip


def _components() -> dict[str, Any]:
    prompts = BatchedDataDict(
        {
            "message_log": [[{"role": "user", "content": "q", "token_ids": torch.tensor([1, 2, 3])}]] * 2,
            "task_name": ["math"] * 2, "extra_env_info": [{}] * 2, "loss_multiplier": torch.ones(2),
            "idx": torch.arange(2), "length": torch.tensor([3, 3]), "total_reward": torch.zeros(2),
        }
    )  # fmt: skip
    dataloader = MagicMock()
    dataloader.__iter__ = lambda self: iter([prompts] * 10)
    dataloader.__len__ = MagicMock(return_value=10)
    # NeMo-RL's `_mock_policy_generation`: a MegatronGeneration spec, so the weight refit is an in-process call
    generation = MagicMock(spec=importlib.import_module("nemo_rl.models.generation.megatron").MegatronGeneration)
    generation.requires_kv_scale_sync = False
    generation.get_logger_metrics.return_value = {}
    for name, value in (("blocks_training", False), ("wake_carries_weight_updates", False)):  # main only
        if hasattr(generation, name):
            getattr(generation, name).return_value = value
    if hasattr(generation, "weight_synchronizer"):
        generation.weight_synchronizer = MagicMock(is_stale=True)
        generation.weight_synchronizer.sync_weights.return_value = {}
    tokenizer = MagicMock()
    tokenizer.pad_token_id = 0
    envs = {"math": MagicMock()}
    return {"generation": generation, "dataloader": dataloader, "tokenizer": tokenizer, "envs": envs}


def _save_state() -> Any:
    make = getattr(grpo_mod, "_initial_grpo_save_state", None) or grpo_mod._default_grpo_save_state
    return make()


SEQ_ERROR = {"max_seq_mult_prob_error": 0.0, "mean_seq_mult_prob_error": 0.0, "min_seq_mult_prob_error": 0.0,
             "max_seq_mult_prob_error_after_mask": 0.0, "mean_seq_mult_prob_error_after_mask": 0.0,
             "min_seq_mult_prob_error_after_mask": 0.0, "num_masked_seqs": 0, "masked_correct_pct": 0.0}  # fmt: skip
STEPS = 3
GRPO_CASES = [(mode, r3) for mode in sorted(LOSS_MODES) for r3 in (False, True)]  # Top-K modes: Top-K on


@pytest.fixture
def restore_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`install_topk_plumbing` patches NeMo-RL's modules in place: undo it after the test."""
    names = {
        "nemo_rl.models.generation.vllm.vllm_generation": ["resolve_generation_worker_cls"],
        "nemo_rl.experience.rollouts": ["generate_responses"],
        "nemo_rl.algorithms.grpo": ["add_grpo_token_loss_masks_and_generation_logprobs",
                                    "_preserve_router_replay_routed_experts"],
    }  # fmt: skip
    for module, attributes in names.items():
        loaded = importlib.import_module(module)
        for attribute in attributes:
            monkeypatch.setattr(loaded, attribute, getattr(loaded, attribute))
    registry = importlib.import_module("nemo_rl.distributed.ray_actor_environment_registry").ACTOR_ENVIRONMENT_REGISTRY
    monkeypatch.setattr(
        importlib.import_module("nemo_rl.distributed.ray_actor_environment_registry"),
        "ACTOR_ENVIRONMENT_REGISTRY",
        dict(registry),
    )
    monkeypatch.delenv("NEMO_DPPO_LOGPROBS_TOPK", raising=False)


@pytest.mark.parametrize(("mode", "router_replay"), GRPO_CASES)
def test_grpo_train_runs_dppo_for_three_steps(
    mode: str, router_replay: bool, restore_plumbing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    topk = get_mode(mode).needs_topk
    section = {"reference_policy_kl_penalty": 0.0, "use_importance_sampling_correction": True}
    loss_fn = DPPOLossFn({**section, "mode": mode, "topk": K})
    if topk:
        install_topk_plumbing(K)
    config = master_config(section, router_replay, STEPS)
    policy, parts = CPUPolicy(router_replay), _components()
    mock_policy = MagicMock()
    mock_policy.get_logprobs.side_effect = policy.get_logprobs
    mock_policy.get_reference_policy_logprobs.side_effect = policy.get_reference_policy_logprobs
    mock_policy.train.side_effect = policy.train
    rollouts = iter([(rollout_batch(s, topk, router_replay), {"mean_gen_tokens_per_sample": 4.0}) for s in range(9)])
    logger = MagicMock()
    with (
        patch("nemo_rl.algorithms.grpo.run_multi_turn_rollout", side_effect=lambda *a, **k: next(rollouts)),
        patch("nemo_rl.algorithms.grpo.compute_and_apply_seq_logprob_error_masking", return_value=dict(SEQ_ERROR)),
        patch("nemo_rl.utils.memory_tracker.memory_summary", return_value=""),  # a Ray-cluster report: no cluster
        patch("nemo_rl.algorithms.grpo.ray.get", side_effect=lambda value, **_: value),  # as NeMo-RL main's tests
    ):
        grpo_mod.grpo_train(
            mock_policy, parts["generation"], parts["dataloader"], parts["dataloader"], parts["tokenizer"], loss_fn,
            parts["envs"], parts["envs"], logger, MagicMock(), _save_state(), config,
        )  # fmt: skip
    assert len(policy.batches) == STEPS
    assert capsys.readouterr().out.count("Generation KL Error") == STEPS
    for batch in policy.batches:  # the batch grpo_train built carried what the mode needs
        assert batch["advantages"].abs().sum() > 0 and batch["token_mask"].sum() == 16
        assert ("generation_topk_ids" in batch) == topk
    logged = [c.args[0] for c in logger.log_metrics.call_args_list if "gen_kl_error" in c.args[0]]
    assert len(logged) == STEPS and all(math.isfinite(m["loss"]) and m["gen_kl_error"] > 0 for m in logged)


# --- the loop-key table against the installed NeMo-RL's source ------------------------------------------------------

_READ = re.compile(r"""(?<![\w.])(?:metrics|loss_metrics)\[\s*['"](\w+)['"]\s*\](?!\s*=[^=])""")
_SCANNED = ("nemo_rl/algorithms/grpo.py", "nemo_rl/algorithms/grpo_sync.py", "nemo_rl/models/policy/workers")


def _reads_in_installed_source() -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {}
    for root in _SCANNED:
        path = NEMO_RL_ROOT / root
        for file in [path] if path.is_file() else sorted(path.glob("*.py")):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip().startswith("#"):
                    continue
                for key in _READ.findall(line):
                    found.setdefault(key, []).append((str(file.relative_to(NEMO_RL_ROOT)), number))
    return found


def test_loop_key_table_matches_installed_nemo_rl() -> None:
    found = _reads_in_installed_source()
    unknown = sorted(set(found) - set(LOOP_READS) - set(NOT_FROM_THE_LOSS) - set(REDUCED_BY_EXTREMUM))
    assert not unknown, f"NeMo-RL reads new metric keys {unknown} at {[found[k] for k in unknown]}: add them"
    versions = {v for table in (LOOP_READS, REDUCED_BY_EXTREMUM) for per_version in table.values() for v in per_version}
    matching = [v for v in sorted(versions) if all(
        key in (NEMO_RL_ROOT / f).read_text().splitlines()[line - 1]
        for table in (LOOP_READS, REDUCED_BY_EXTREMUM) for key, per in table.items() for f, line in per.get(v, [])
        if (NEMO_RL_ROOT / f).exists()
    )]  # fmt: skip
    assert matching, "the installed NeMo-RL matches no version in LOOP_READS: update the source locations"
