"""The single-node RL loop: rollout (μ) → log π_old → mini-batch updates with the policy loss → weight sync.

Per step: `prompts_per_step` prompts × `rollout.n` samples; group-relative advantages; the batch is split into
`train.mini_batches` optimizer steps (the paper: 8), so every mini-batch after the first is off-policy with
respect to μ — exactly the regime the trust region is for.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nemo_dppo import launch
from nemo_dppo.advantages import compute_advantages
from nemo_dppo.batching import RolloutBatch, collate_rollouts
from nemo_dppo.checkpoint import CheckpointManager, TrainerState, set_rng_state
from nemo_dppo.config import Config, to_yaml
from nemo_dppo.engines.base import RolloutEngine, SamplingParams
from nemo_dppo.engines.hf_rollout import HFRolloutEngine
from nemo_dppo.engines.hf_training import HFTrainingEngine
from nemo_dppo.errors import UserError
from nemo_dppo.losses import compute_policy_loss
from nemo_dppo.losses.modes import get_mode
from nemo_dppo.megatron.job import Job
from nemo_dppo.models.tiny_moe import load_model_dir
from nemo_dppo.run_logger import RunLogger
from nemo_dppo.tasks.arithmetic import ArithmeticTask, Problem, reward
from nemo_dppo.warm_start import warm_started_model_dir

#: Top-K size when a Top-K loss mode runs and `rollout.logprobs_topk` is unset (the paper's K).
DEFAULT_TOPK = 20


class Trainer:
    """The RL loop. With `train.backend=megatron` every rank of the job builds one (its shard of the policy);
    rank 0 alone owns the rollout engine, evaluation, logging and checkpoint writing, and broadcasts each step's
    rollout batch to the other ranks (`nemo_dppo.megatron.job`)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.console = Console(stderr=True)
        self.mode = get_mode(cfg.loss.mode)
        self.topk = cfg.rollout.logprobs_topk if cfg.rollout.logprobs_topk is not None else 0
        if self.mode.needs_topk and cfg.rollout.logprobs_topk is None:
            self.topk = DEFAULT_TOPK
        if self.mode.needs_topk and self.topk == 0:
            raise UserError(f"loss.mode={cfg.loss.mode} needs Top-K log-probs; set rollout.logprobs_topk > 0")
        self.job = Job.start(cfg)  # joins the process group of a multi-rank Megatron job (one rank: no-op)
        if self.job.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints) if self.job.is_main else None
        self.state = TrainerState(step=0)
        resume_from = self.job.share(self.checkpoints.latest() if cfg.resume and self.checkpoints else None)
        torch.manual_seed(cfg.seed)
        model_dir = resume_from / "model" if resume_from is not None else self.job.share(self._main_model_dir())
        self.model, self.tokenizer = _load_policy(model_dir) if self.job.is_main else (None, None)
        if self.tokenizer is not None and self.topk > len(self.tokenizer):
            raise UserError(f"rollout.logprobs_topk={self.topk} exceeds the vocabulary size {len(self.tokenizer)}")
        self.train_engine = self._training_engine(model_dir)
        self.rollout_engine = self._make_rollout_engine(model_dir) if self.job.is_main else None
        if resume_from is not None:
            self._resume(resume_from)
        self.task, self.reward_fn = _make_task(cfg)
        # Math prompts go through the model's chat template when it has one (as `nemo-dppo eval` does).
        self.use_chat_template = cfg.task.name == "math" and bool(getattr(self.tokenizer, "chat_template", None))
        self.train_problems = self.task.all_problems("train")
        self.eval_problems = self.task.all_problems("eval")[: cfg.task.num_eval_prompts]
        if self.job.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self._stop_signal: str | None = None

    def _make_rollout_engine(self, model_dir: Path) -> RolloutEngine:
        """`rollout.engine`: `hf` (transformers generate) or `vllm` (in-process vLLM, loaded from `model_dir`)."""
        rollout = self.cfg.rollout
        if rollout.engine != "vllm":
            return HFRolloutEngine(self.model, self.tokenizer, dtype=rollout.dtype)
        from nemo_dppo.engines.vllm_internals import VLLMUnavailableError

        try:
            from nemo_dppo.engines.vllm_rollout import VLLMRolloutEngine

            return VLLMRolloutEngine(
                str(model_dir),
                self.tokenizer,
                dtype=rollout.dtype,
                max_model_len=rollout.vllm_max_model_len,
                kv_cache_mb=rollout.vllm_kv_cache_mb,
                max_logprobs=max(self.topk, 20),
                seed=self.cfg.seed,
            )
        except VLLMUnavailableError as err:
            raise UserError(str(err)) from None

    def _training_engine(self, model_dir: Path) -> Any:
        cfg = self.cfg
        if cfg.train.backend == "megatron":
            from nemo_dppo.engines.megatron_training import MegatronTrainingEngine

            return MegatronTrainingEngine(
                model_dir,
                cfg.train,
                temperature=cfg.rollout.temperature,
                router_replay=cfg.rollout.router_replay,
                seed=cfg.seed,
            )
        return HFTrainingEngine(
            self.model, cfg.train, temperature=cfg.rollout.temperature, router_replay=cfg.rollout.router_replay
        )

    def _resume(self, checkpoint: Path) -> None:
        self.state, payload = CheckpointManager.load_state(checkpoint)
        if self.cfg.train.backend == "megatron":
            from nemo_dppo.megatron.checkpoint_io import load_shard

            load_shard(checkpoint, self.train_engine)  # model, optimizer (+ fp16 loss scale), this rank's RNG
        else:
            self.train_engine.optimizer.load_state_dict(payload["optimizer"])
            if self.train_engine.scaler is not None and "grad_scaler" in payload:
                self.train_engine.scaler.load_state_dict(payload["grad_scaler"])
        if self.job.is_main:
            set_rng_state(payload["rng"])
            self.console.print(f"resumed from {checkpoint} (step {self.state.step})")

    def _main_model_dir(self) -> Path | None:
        """The initial policy directory, prepared (warm start) by the main rank only."""
        return self._initial_model_dir() if self.job.is_main else None

    def _initial_model_dir(self) -> Path:
        return Trainer.initial_model_dir(self.cfg)

    @staticmethod
    def initial_model_dir(cfg: Config) -> Path:
        """`model.path`, or the cached warm-started tiny policy (trained on first use)."""
        if cfg.model.path is not None:
            return Path(cfg.model.path).expanduser()
        return warm_started_model_dir(cfg.model, cfg.task, cfg.warm_start)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until `cfg.steps` (or a stop signal); returns the last step's metrics (on the main rank)."""
        cfg = self.cfg
        last: dict[str, float] = {}
        main = self.job.is_main
        with (
            _stop_signals(self),
            RunLogger(self.run_dir, resume_from_step=self.state.step if self.cfg.resume else -1)
            if main
            else _NoLogger() as log,
            _progress(cfg.progress and main, self.console) as progress,
        ):
            task_id = progress.add_task("DPPO", total=cfg.steps, completed=self.state.step, reward=float("nan"))
            if self.state.step == 0 and main:
                log.log(0, self.evaluate())
            while self.state.step < cfg.steps and not self.job.any(self._stop_signal is not None):
                step = self.state.step + 1
                last = self.train_one_step(step)
                if main and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last.update(self.evaluate())
                self.state.step = step
                log.log(step, last)
                progress.update(task_id, advance=1, reward=last.get("reward/mean", float("nan")))
                stopping = self.job.any(self._stop_signal is not None)
                if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                    self.save()
                if stopping:
                    self._stop_signal = self._stop_signal or "stop requested on another rank"
                    break
        if self._stop_signal is not None and main:
            self.console.print(f"{self._stop_signal}: checkpoint written at step {self.state.step}; exiting")
        return last

    def train_one_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        problems = self._prompts_for_step(step)
        with _timed(timings, "rollout"):
            batch, rollout_metrics = self.job.share(self.rollout(problems, step) if self.job.is_main else None)
        with _timed(timings, "logprob"):
            old = self.train_engine.compute_logprobs(batch, with_topk=self.mode.needs_topk)
            batch.old_logprobs = old.token.logprobs
            on_policy = self._on_policy_metrics(batch, old)
        with _timed(timings, "train"):
            train_metrics = self.update(batch, step)
        with _timed(timings, "sync"):
            weights = self.train_engine.hf_state_dict()  # collective on a multi-rank job
            if self.rollout_engine is not None:
                self.rollout_engine.sync_weights(weights)
        timings["step"] = time.perf_counter() - start
        return {
            **rollout_metrics,
            **on_policy,
            **{f"loss/{k}": v for k, v in train_metrics.items()},
            **{f"time/{k}": v for k, v in timings.items()},
        }

    def _prompts_for_step(self, step: int) -> list[Problem]:
        """The data position is the step: prompts depend only on (seed, step), so a resume needs nothing else."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        picks = torch.randint(len(self.train_problems), (self.cfg.train.prompts_per_step,), generator=generator)
        return [self.train_problems[i] for i in picks.tolist()]

    def rollout(self, problems: list[Problem], step: int) -> tuple[RolloutBatch, dict[str, float]]:
        cfg = self.cfg
        params = SamplingParams(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.seed * 1_000_003 + step,
            logprobs_topk=self.topk,
            record_routes=self.train_engine.is_moe,
        )
        prompt_ids = [self._encode(p.prompt) for p in problems]
        groups = self.rollout_engine.generate(prompt_ids, params)
        samples, group_ids, rewards = [], [], []
        for g, (problem, group) in enumerate(zip(problems, groups, strict=True)):
            for sample in group:
                text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
                samples.append(sample)
                group_ids.append(g)
                rewards.append(self.reward_fn(text, problem.answer, cfg.task.reward_correct, cfg.task.reward_wrong))
        reward_tensor = torch.tensor(rewards)
        advantages = compute_advantages(
            cfg.advantage.estimator, reward_tensor, torch.tensor(group_ids), cfg.advantage.eps
        )
        batch = collate_rollouts(samples, group_ids, rewards, advantages, self.rollout_engine.pad_id)
        lengths = batch.response_mask.sum(-1).float()
        metrics = {
            "reward/mean": float(reward_tensor.mean()),
            "reward/accuracy": float((reward_tensor == cfg.task.reward_correct).float().mean()),
            "response/length_mean": float(lengths.mean()),
            "response/truncated_frac": float(sum(not s.finished for s in samples) / len(samples)),
        }
        return batch, metrics

    def _on_policy_metrics(self, batch: RolloutBatch, old: Any) -> dict[str, float]:
        """Training–inference mismatch on identical weights: π_old (trainer) vs μ (rollout engine)."""
        _, m = compute_policy_loss(
            batch.old_logprobs, batch.rollout_logprobs, batch.advantages, batch.response_mask, self.cfg.loss,
            old_logprobs=batch.old_logprobs,
            topk_rollout_logprobs=batch.topk_rollout_logprobs if self.mode.needs_topk else None,
            topk_train_logprobs=old.token.topk_logprobs if self.mode.needs_topk else None,
        )  # fmt: skip
        mask = batch.response_mask
        metrics = {
            "mismatch/kl_k1": m["mismatch_kl_k1"],
            "mismatch/kl_k3": m["mismatch_kl_k3"],
            "mismatch/abs_prob_diff_mean": m["abs_prob_diff_mean"],
            "mismatch/abs_prob_diff_max": m["abs_prob_diff_max"],
            "entropy/mean": float(old.token.entropy[mask].mean()) if mask.any() else 0.0,
        }
        if old.used_disagreement is not None:
            metrics["routing/disagreement"] = old.used_disagreement  # experts used in training vs rollout
            metrics["routing/own_disagreement"] = old.own_disagreement  # training router's own pick vs rollout
        return metrics

    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """`train.mini_batches` optimizer steps over a seeded shuffle of the batch; metrics averaged."""
        n = batch.num_sequences
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + step))
        size = n // self.cfg.train.mini_batches
        per_minibatch = [
            self.train_engine.train_step(batch.select(order[i : i + size]), self.cfg.loss) for i in range(0, n, size)
        ]
        return average_metrics(per_minibatch)

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out prompts."""
        start = time.perf_counter()
        params = SamplingParams(n=1, max_new_tokens=self.cfg.rollout.max_new_tokens, greedy=True)
        prompts = [self._encode(p.prompt) for p in self.eval_problems]
        groups = self.rollout_engine.generate(prompts, params)
        correct = [
            self.reward_fn(self.tokenizer.decode(g[0].response_ids, skip_special_tokens=True), p.answer) > 0
            for p, g in zip(self.eval_problems, groups, strict=True)
        ]
        accuracy = sum(correct) / len(correct)
        if self.state.best_eval_accuracy is None or accuracy > self.state.best_eval_accuracy:
            self.state.best_eval_accuracy = accuracy
        return {"eval/accuracy": accuracy, "time/eval": time.perf_counter() - start}

    def save(self) -> Path:
        if self.cfg.train.backend == "megatron":  # collective: every rank writes its shard
            from nemo_dppo.megatron.checkpoint_io import save_sharded

            root = self.run_dir / "checkpoints"
            return save_sharded(self.checkpoints, root, self.state, self.train_engine, self.tokenizer,
                                to_yaml(self.cfg))  # fmt: skip
        assert self.checkpoints is not None
        extra = {}
        if self.train_engine.scaler is not None:
            extra["grad_scaler"] = self.train_engine.scaler.state_dict()
        return self.checkpoints.save(
            self.state, self.model, self.tokenizer, self.train_engine.optimizer, to_yaml(self.cfg), extra
        )

    def _encode(self, prompt: str) -> list[int]:
        from nemo_dppo.evaluate import encode_prompt

        return encode_prompt(self.tokenizer, prompt, self.use_chat_template)

    def close(self) -> None:
        """Free the rollout engine (vLLM: its engine and process group) and leave the process group of a
        Megatron job (lets tests build several jobs in one process)."""
        shutdown = getattr(self.rollout_engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.job.close()

    def request_stop(self, name: str) -> None:
        self._stop_signal = name


def average_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean over mini-batches; min of `*_min`, max of `*_max`."""
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts if key in p]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def train(cfg: Config) -> dict[str, float]:
    """Run a whole training job from a config, then write plots and the report.

    A Megatron layout of several ranks (`train.megatron`) starts them on this machine first (`nemo_dppo.launch`)
    unless this process already is one of them; the launcher returns the main rank's last metrics.
    """
    if Job.needs_launch(cfg):
        return Job.launch(cfg, _initial_model_dir=lambda: Trainer.initial_model_dir(cfg))
    if not launch.is_launched_rank():
        Job.precheck(cfg, lambda: Trainer.initial_model_dir(cfg))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    trainer = Trainer(cfg)
    try:
        last = trainer.fit()
        if trainer.job.is_main:
            from nemo_dppo.plots import plot_run, write_report

            plot_run(trainer.run_dir)
            report = write_report(trainer.run_dir)
            trainer.console.print(f"run directory: {trainer.run_dir}  (report: {report})")
    finally:
        trainer.close()
    return last


class _NoLogger(contextlib.AbstractContextManager):
    """Stands for `RunLogger` on the ranks that do not log."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        return None


def _make_task(cfg: Config) -> tuple[Any, Callable[..., float]]:
    """The task (`all_problems(split)` → objects with `.prompt` / `.answer`) and its reward
    `reward(text, answer, correct, wrong)`."""
    if cfg.task.name == "math":
        from nemo_dppo.data import MathTask

        task = MathTask(
            cfg.task.train_path,  # type: ignore[arg-type]  # checked by TaskConfig
            eval_path=cfg.task.eval_path,
            seed=cfg.task.seed,
            reward_timeout_s=cfg.task.reward_timeout_s,
        )
        return task, task.reward
    return ArithmeticTask(num_digits=cfg.task.num_digits, ops=cfg.task.ops, seed=cfg.task.seed), reward


def _load_policy(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    try:
        model, tokenizer = load_model_dir(str(model_dir), "fp32")
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UserError(f"cannot load the policy from {model_dir}: {err}") from None
    return model, tokenizer


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


@contextmanager
def _stop_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM / SIGUSR1 (Slurm preemption): finish the current step, checkpoint, exit 0."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        trainer.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _progress(enabled: bool, console: Console) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:+.3f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
    with progress:
        yield progress
