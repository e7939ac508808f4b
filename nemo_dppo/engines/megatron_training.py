"""Training engine on megatron-core (`train.backend=megatron`): TP / SP / EP / ETP / PP, native R3, fp16 scaling.

The `TrainingEngine` protocol (`nemo_dppo.engines.base`), called on **every rank** of the job with the same
batch: each rank runs its
data-parallel share through megatron-core's forward-backward schedule (`get_forward_backward_func`: no
pipelining, or 1F1B for pp > 1), and the per-token results are gathered so that every rank returns the whole
batch's tensors, in the same `[N, S − 1]` target coordinates as the `hf` engine.

- log π comes from the column-parallel output layer's vocabulary shards (`parallel_output=True`) through
  `vocab_parallel_logprobs`, which never gathers the vocabulary (one all-reduce of `[tokens, K + 3]`).
- The loss is the `hf` engine's `compute_policy_loss` on each micro-batch with the mini-batch's global token /
  sequence counts, so the per-rank losses add up to the mini-batch loss and data-parallel gradients are summed.
  The reported loss metrics are then recomputed on the gathered mini-batch, exactly as the `hf` engine reports.
- R3: the rollout's routes are laid out in megatron-core's local token order and replayed by its `RouterReplay`
  in every training forward (`nemo_dppo.megatron.routing_replay`); cleared after every step.
- Precision: fp32, or bf16 / fp16 parameters with fp32 main parameters in megatron-core's optimizer; fp16 uses its
  dynamic grad scaler (`loss_scale` metric; an overflow skips the step and backs the scale off).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_dppo.batching import RolloutBatch
from nemo_dppo.config import Config, TrainConfig
from nemo_dppo.distributed.vocab_parallel import vocab_parallel_logprobs
from nemo_dppo.engines.base import ForwardResult, TrainStepResult
from nemo_dppo.errors import TrainingDiverged
from nemo_dppo.logprobs import TokenLogprobs
from nemo_dppo.losses import LossConfig, PolicyLossInput, compute_policy_loss
from nemo_dppo.megatron import cpu_compat, parallel
from nemo_dppo.megatron import optimizer as mopt
from nemo_dppo.megatron.hf_export import export_hf_state_dict
from nemo_dppo.megatron.microbatches import MicroBatch, split_for_rank
from nemo_dppo.megatron.model import build_policy
from nemo_dppo.megatron.routing_replay import (
    ReplayControl,
    disagreement_counts,
    install_fallback_replay,
    to_megatron_order,
)


class MegatronTrainingEngine:
    """Holds this rank's shard of the policy π and megatron-core's optimizer."""

    def __init__(
        self,
        hf_dir: str | Path,
        train_cfg: TrainConfig,
        *,
        temperature: float = 1.0,
        router_replay: bool = False,
        seed: int = 0,
    ) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.cfg = train_cfg
        self.layout = train_cfg.megatron
        self.temperature = temperature
        self.router_replay = router_replay
        self.hf_dir = Path(hf_dir)
        self.coords = parallel.initialize(self.layout, seed)
        self.policy = build_policy(self.hf_dir, self.layout, precision=train_cfg.precision)
        self.model = self.policy.module
        self.is_moe = self.policy.config.num_moe_experts is not None
        if router_replay and not self.is_moe:
            raise ValueError("rollout.router_replay=true needs an MoE model")
        self.optimizer = mopt.build_optimizer(self.policy.chunks, train_cfg)
        self.scaler = None  # fp16 loss scaling lives in megatron-core's optimizer (`loss_scale()`)
        self.replay = ReplayControl(install_fallback_replay())
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if self.coords.tp_size > 1 else None
        self.seq_multiple = self.coords.tp_size if self.policy.config.sequence_parallel else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        config = self.policy.config
        config.no_sync_func = self.model.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        # Gradients are summed over data-parallel ranks and never divided by a token count: the loss already has
        # the global denominators (calculate_per_token_loss only selects the summing DDP mode).
        config.finalize_model_grads_func = lambda chunks, _num_tokens=None, **kw: finalize_model_grads(chunks, **kw)

    @classmethod
    def from_config(cls, cfg: Config, model_dir: Path) -> MegatronTrainingEngine:
        """This rank's shard of the policy in `model_dir` with the run's layout, optimiser and R3 setting."""
        return cls(
            model_dir, cfg.train, temperature=cfg.rollout.temperature, router_replay=cfg.rollout.router_replay,
            seed=cfg.seed,
        )  # fmt: skip

    # --------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> ForwardResult:
        """log π_old on the rollout batch before any update (+ Top-K, entropy, routing disagreement)."""
        for chunk in self.policy.chunks:
            chunk.eval()
        micro = split_for_rank(
            batch,
            dp_rank=self.coords.dp_rank,
            dp_size=self.coords.dp_size,
            micro_batch_size=self.cfg.micro_batch_size,
            seq_multiple=self.seq_multiple,
            device=self.device,
        )
        counts = torch.zeros(4, dtype=torch.int64)
        with_topk = batch.topk_ids is not None
        loss_func = partial(self._logprob_outputs, with_topk=with_topk, with_entropy=True, loss_cfg=None, totals=None)
        outputs = self._run_schedule(micro, loss_func, counts, forward_only=True)
        gathered, counts = self._gather(outputs, counts, batch.num_sequences)
        result = self._forward_result(batch, gathered, counts)
        bad = batch.response_mask & ~torch.isfinite(result.token.logprobs)
        if bad.any():
            raise TrainingDiverged(
                f"the policy's log-probs are NaN/inf at {int(bad.sum())} response tokens before the update"
            )
        return result

    def _forward_result(self, batch: RolloutBatch, gathered: dict[str, Any], counts: torch.Tensor) -> ForwardResult:
        token = TokenLogprobs(gathered["logprobs"], gathered.get("topk"), gathered.get("entropy"))
        used = own = None
        if batch.routes is not None and self.is_moe:
            used = float(counts[0]) / max(int(counts[1]), 1)
            own = float(counts[2]) / max(int(counts[3]), 1)
        return ForwardResult(token, used, own)

    # --------------------------------------------------------------------------------------------- update
    def train_step(self, minibatch: RolloutBatch, loss_cfg: LossConfig) -> TrainStepResult:
        """One optimizer step on a mini-batch (each rank its data-parallel share, micro-batched)."""
        for chunk in self.policy.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        needs_topk = minibatch.topk_ids is not None
        totals = (max(float(minibatch.response_mask.sum()), 1.0), float(minibatch.num_sequences))
        micro = split_for_rank(
            minibatch,
            dp_rank=self.coords.dp_rank,
            dp_size=self.coords.dp_size,
            micro_batch_size=self.cfg.micro_batch_size,
            seq_multiple=self.seq_multiple,
            device=self.device,
        )
        counts = torch.zeros(4, dtype=torch.int64)
        loss_func = partial(
            self._logprob_outputs, with_topk=needs_topk, with_entropy=True, loss_cfg=loss_cfg, totals=totals
        )
        outputs = self._run_schedule(micro, loss_func, counts, forward_only=False)
        gathered, counts = self._gather(outputs, counts, minibatch.num_sequences)
        if gathered["error"]:
            self.optimizer.zero_grad()
            raise TrainingDiverged(f"{gathered['error']}; step not applied")
        with torch.no_grad():
            inputs = PolicyLossInput(
                logprobs=gathered["logprobs"],
                rollout_logprobs=minibatch.rollout_logprobs,
                advantages=minibatch.advantages,
                response_mask=minibatch.response_mask,
                old_logprobs=minibatch.old_logprobs,
                topk_rollout_logprobs=minibatch.topk_rollout_logprobs,
                topk_train_logprobs=gathered.get("topk"),
            )
            loss, metrics = compute_policy_loss(inputs, loss_cfg)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad()
            raise TrainingDiverged(f"the policy loss is {loss.item()} (mode {loss_cfg.mode}); step not applied")
        self._zero_padding_embedding_grad()
        scale = mopt.loss_scale(self.optimizer)
        result = mopt.step(self.optimizer, self.cfg.grad_clip)
        if scale is not None:  # fp16: an overflow skips the step and backs the scale off
            metrics["loss_scale"] = scale
            metrics["skipped_step"] = float(not result.applied)
        elif not result.applied:
            self.optimizer.zero_grad()
            raise TrainingDiverged(f"the gradient norm is {result.grad_norm} (mode {loss_cfg.mode}); step not applied")
        metrics["grad_norm"] = result.grad_norm
        self.replay.clear()
        return TrainStepResult(metrics, self._forward_result(minibatch, gathered, counts))

    def hf_state_dict(self) -> Mapping[str, torch.Tensor]:
        """The policy under HF names (collective: every rank must call it; every rank gets the full tensors)."""
        return export_hf_state_dict(self.policy)

    def loss_scale(self) -> float | None:
        return mopt.loss_scale(self.optimizer)

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, manager: Any, state: Any, tokenizer: Any, config_yaml: str) -> Path:
        """Collective: every rank writes its shard; the main rank (holding `manager`) publishes the step."""
        from nemo_dppo.megatron.checkpoint_io import save_sharded

        root = manager.root if manager is not None else Path(".")
        return save_sharded(manager, root, state, self, tokenizer, config_yaml)

    def load_checkpoint(self, checkpoint: Path, payload: Mapping[str, Any]) -> None:
        """Model, optimizer (+ fp16 loss scale) and this rank's RNG from its shard (same layout required)."""
        from nemo_dppo.megatron.checkpoint_io import load_shard

        load_shard(checkpoint, self)

    def layout_description(self) -> dict[str, Any]:
        """What a checkpoint's shards depend on: the parallel layout and the training precision."""
        layout = self.layout
        return {"tp": layout.tp, "ep": layout.ep, "etp": layout.etp, "pp": layout.pp,
                "dp": layout.data_parallel_size, "precision": self.cfg.precision}  # fmt: skip

    def shard_state(self) -> dict[str, Any]:
        """This rank's model shard, optimizer state (fp32 main parameters, moments, loss scale) and RNG."""
        with self._cpu_literals():
            optimizer_state = self.optimizer.state_dict()
        return {"model": self.model.state_dict(), "optimizer": optimizer_state, "rng": torch.get_rng_state()}

    def load_shard_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        with self._cpu_literals():
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    # --------------------------------------------------------------------------------------------- internals
    def _zero_padding_embedding_grad(self) -> None:
        """HF's `nn.Embedding(padding_idx=pad_token_id)` never updates the pad row (even when a rollout sampled the
        pad token); megatron-core's vocab-parallel embedding has no padding index, so its row is zeroed here."""
        pad_id = self.policy.hf_config.get("pad_token_id")
        embedding = getattr(unwrap(self.model), "embedding", None)
        if pad_id is None or embedding is None:
            return
        weight = embedding.word_embeddings.weight
        local = int(pad_id) - int(embedding.word_embeddings.vocab_start_index)
        grad = getattr(weight, "main_grad", None)
        if grad is not None and 0 <= local < weight.shape[0]:
            grad[local].zero_()

    def _run_schedule(
        self, micro: list[MicroBatch], loss_func: Any, counts: torch.Tensor, *, forward_only: bool
    ) -> list[dict[str, Any]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            mb = next(data)
            with cpu_compat.native_torch():
                reference = self._set_routing(mb)
                logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None)
                if reference is not None:
                    used = disagreement_counts(self.replay.used(), reference)
                    own = disagreement_counts(self.replay.own(), reference)
                    counts.add_(torch.tensor([*used, *own]))
            return logits, partial(_natively, loss_func, mb)

        seq_len = int(micro[0].input_ids.shape[1])
        with self._cpu_literals():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro),
                model=self.policy.chunks,
                num_microbatches=len(micro),
                seq_length=seq_len,
                micro_batch_size=int(micro[0].input_ids.shape[0]),
                forward_only=forward_only,
            )
        if forward_only:
            self.replay.clear()
        return list(outputs or [])

    @contextmanager
    def _cpu_literals(self) -> Iterator[None]:
        """Pipeline schedules allocate `device="cuda"` buffers; DDP and the optimizer check CUDA type names."""
        with cpu_compat.cuda_literals_to_cpu():
            yield

    def _set_routing(self, mb: MicroBatch) -> list[torch.Tensor] | None:
        """Replay (R3) or record the routes of this micro-batch's forward; returns the rollout's routes in
        megatron-core's order for the disagreement counts (None when the batch has no routes)."""
        if not self.is_moe or mb.batch.routes is None:
            self.replay.record()
            return None
        first = self._first_local_moe_layer()
        reference = to_megatron_order(
            mb.batch.routes,
            mb.batch.route_valid,
            seq_len=int(mb.input_ids.shape[1]),
            tp_rank=self.coords.tp_rank,
            tp_size=self.coords.tp_size,
            sequence_parallel=bool(self.policy.config.sequence_parallel),
            layers=range(first, first + len(self.replay.instances)),
        )
        if self.router_replay:
            self.replay.replay(reference)
        else:
            self.replay.record()
        return reference

    def _first_local_moe_layer(self) -> int:
        """Global index (among MoE layers) of this pipeline stage's first MoE layer (every layer is MoE here)."""
        layers = getattr(getattr(unwrap(self.model), "decoder", None), "layers", None)
        if layers is None or len(layers) == 0:
            return 0
        return int(layers[0].layer_number) - 1

    def _logprob_outputs(
        self,
        mb: MicroBatch,
        logits: torch.Tensor,
        *,
        with_topk: bool,
        with_entropy: bool,
        loss_cfg: LossConfig | None,
        totals: tuple[float, float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """megatron-core's loss function: (loss, token count, per-token outputs for gathering)."""
        t = mb.num_targets
        topk_ids = None
        if with_topk and mb.batch.topk_ids is not None:
            k = mb.batch.topk_ids.shape[-1]
            topk_ids = torch.zeros(*mb.targets.shape, k, dtype=torch.int64, device=mb.targets.device)
            topk_ids[:, :t] = mb.batch.topk_ids
        token = vocab_parallel_logprobs(
            logits,
            mb.targets,
            group=self.tp_group,
            topk_ids=topk_ids,
            temperature=self.temperature,
            with_entropy=with_entropy,
        )
        logprobs = token.logprobs[:, :t]
        topk = token.topk_logprobs[:, :t] if token.topk_logprobs is not None else None
        out: dict[str, Any] = {"rows": mb.rows, "logprobs": logprobs.detach().cpu(), "error": ""}
        if topk is not None:
            out["topk"] = topk.cpu()
        if token.entropy is not None:
            out["entropy"] = token.entropy[:, :t].cpu()
        loss = logprobs.sum() * 0.0
        if loss_cfg is not None and totals is not None:
            try:
                inputs = PolicyLossInput(
                    logprobs=logprobs,
                    rollout_logprobs=mb.batch.rollout_logprobs,
                    advantages=mb.batch.advantages,
                    response_mask=mb.batch.response_mask,
                    old_logprobs=mb.batch.old_logprobs,
                    topk_rollout_logprobs=mb.batch.topk_rollout_logprobs if topk is not None else None,
                    topk_train_logprobs=topk,
                    global_num_tokens=totals[0],
                    global_num_seqs=totals[1],
                )
                loss, _ = compute_policy_loss(inputs, loss_cfg)
            except ValueError as err:  # non-finite log π: decided together with the other ranks after the pass
                out["error"] = str(err)
                loss = logprobs.sum() * 0.0
        return loss, torch.tensor(1, dtype=torch.int, device=logits.device), out

    def _gather(
        self, outputs: list[dict[str, Any]], counts: torch.Tensor, num_rows: int
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Every rank's per-row outputs → the whole batch's tensors on every rank (+ summed routing counts).

        Under tp > 1 several ranks return the same rows (identical values), under pp > 1 only the last stage
        returns any; the routing counts are summed (each token-layer route is counted on exactly one rank).
        """
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {"outputs": outputs, "counts": counts})
        total_counts = torch.zeros_like(counts)
        merged: dict[str, Any] = {"error": ""}
        seen: set[int] = set()
        for part in parts:
            total_counts += part["counts"]
            for out in part["outputs"]:
                merged["error"] = merged["error"] or out["error"]
                real = out["rows"] >= 0
                rows = out["rows"][real]
                seen.update(rows.tolist())
                for key in ("logprobs", "topk", "entropy"):
                    if key in out:
                        values = out[key][real]
                        if key not in merged:
                            merged[key] = torch.zeros(num_rows, *values.shape[1:], dtype=values.dtype)
                        merged[key][rows] = values
        if len(seen) != num_rows:
            raise RuntimeError(f"gathered {len(seen)} of {num_rows} rows from the data-parallel ranks")
        return merged, total_counts


def _natively(loss_func: Any, mb: MicroBatch, output: torch.Tensor) -> Any:
    """The loss function outside `cuda_literals_to_cpu` (it needs no device mapping)."""
    with cpu_compat.native_torch():
        return loss_func(mb, output)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
