"""The single-node RL loop: rollout (μ) → log π_old → mini-batch updates with the policy loss → weight sync.

Per step: `prompts_per_step` prompts × `rollout.n` samples; group-relative advantages; the batch is split into
`train.mini_batches` optimizer steps (the paper: 8), so every mini-batch after the first is off-policy with
respect to μ — exactly the regime the trust region is for.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nemo_dppo.advantages import compute_advantages
from nemo_dppo.batching import RolloutBatch, collate_rollouts
from nemo_dppo.checkpoint import CheckpointManager, TrainerState, set_rng_state
from nemo_dppo.config import Config, to_yaml
from nemo_dppo.engines.base import SamplingParams
from nemo_dppo.engines.hf_rollout import HFRolloutEngine
from nemo_dppo.engines.hf_training import HFTrainingEngine
from nemo_dppo.errors import UserError
from nemo_dppo.losses import compute_policy_loss
from nemo_dppo.losses.modes import get_mode
from nemo_dppo.models.tiny_moe import load_model_dir
from nemo_dppo.run_logger import RunLogger
from nemo_dppo.tasks.arithmetic import ArithmeticTask, Problem, reward
from nemo_dppo.warm_start import warm_started_model_dir

#: Top-K size when a Top-K loss mode runs and `rollout.logprobs_topk` is unset (the paper's K).
DEFAULT_TOPK = 20


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = Console(stderr=True)
        self.mode = get_mode(cfg.loss.mode)
        self.topk = cfg.rollout.logprobs_topk if cfg.rollout.logprobs_topk is not None else 0
        if self.mode.needs_topk and cfg.rollout.logprobs_topk is None:
            self.topk = DEFAULT_TOPK
        if self.mode.needs_topk and self.topk == 0:
            raise UserError(f"loss.mode={cfg.loss.mode} needs Top-K log-probs; set rollout.logprobs_topk > 0")
        if cfg.rollout.engine != "hf" or cfg.train.backend != "hf":
            raise UserError(
                f"rollout.engine={cfg.rollout.engine} / train.backend={cfg.train.backend}: this build runs the "
                "'hf' engines only"
            )
        self.checkpoints = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints)
        self.state = TrainerState(step=0)
        resume_from = self.checkpoints.latest() if cfg.resume else None
        torch.manual_seed(cfg.seed)
        model_dir = resume_from / "model" if resume_from is not None else self._initial_model_dir()
        self.model, self.tokenizer = _load_policy(model_dir)
        if self.topk > len(self.tokenizer):
            raise UserError(f"rollout.logprobs_topk={self.topk} exceeds the vocabulary size {len(self.tokenizer)}")
        self.train_engine = HFTrainingEngine(
            self.model, cfg.train, temperature=cfg.rollout.temperature, router_replay=cfg.rollout.router_replay
        )
        self.rollout_engine = HFRolloutEngine(self.model, self.tokenizer, dtype=cfg.rollout.dtype)
        if resume_from is not None:
            self.state, payload = CheckpointManager.load_state(resume_from)
            self.train_engine.optimizer.load_state_dict(payload["optimizer"])
            set_rng_state(payload["rng"])
            if self.train_engine.scaler is not None and "grad_scaler" in payload:
                self.train_engine.scaler.load_state_dict(payload["grad_scaler"])
            self.console.print(f"resumed from {resume_from} (step {self.state.step})")
        self.task = ArithmeticTask(num_digits=cfg.task.num_digits, ops=cfg.task.ops, seed=cfg.task.seed)
        self.train_problems = self.task.all_problems("train")
        self.eval_problems = self.task.all_problems("eval")[: cfg.task.num_eval_prompts]
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self._stop_signal: str | None = None

    def _initial_model_dir(self) -> Path:
        if self.cfg.model.path is not None:
            return Path(self.cfg.model.path).expanduser()
        return warm_started_model_dir(self.cfg.model, self.cfg.task, self.cfg.warm_start)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until `cfg.steps` (or a stop signal); returns the last step's metrics."""
        cfg = self.cfg
        last: dict[str, float] = {}
        with (
            _stop_signals(self),
            RunLogger(self.run_dir, resume_from_step=self.state.step) as log,
            _progress(cfg.progress, self.console) as progress,
        ):
            task_id = progress.add_task("DPPO", total=cfg.steps, completed=self.state.step, reward=float("nan"))
            if self.state.step == 0:
                log.log(0, self.evaluate())
            while self.state.step < cfg.steps and self._stop_signal is None:
                step = self.state.step + 1
                last = self.train_one_step(step)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    last.update(self.evaluate())
                self.state.step = step
                log.log(step, last)
                progress.update(task_id, advance=1, reward=last["reward/mean"])
                if step % cfg.save_every == 0 or step == cfg.steps or self._stop_signal is not None:
                    self.save()
        if self._stop_signal is not None:
            self.console.print(f"{self._stop_signal}: checkpoint written at step {self.state.step}; exiting")
        return last

    def train_one_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        problems = self._prompts_for_step(step)
        with _timed(timings, "rollout"):
            batch, rollout_metrics = self.rollout(problems, step)
        with _timed(timings, "logprob"):
            old = self.train_engine.compute_logprobs(batch, with_topk=self.mode.needs_topk)
            batch.old_logprobs = old.token.logprobs
            on_policy = self._on_policy_metrics(batch, old)
        with _timed(timings, "train"):
            train_metrics = self.update(batch, step)
        with _timed(timings, "sync"):
            self.rollout_engine.sync_weights(self.train_engine.hf_state_dict())
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
        prompt_ids = [self.tokenizer.encode(p.prompt) for p in problems]
        groups = self.rollout_engine.generate(prompt_ids, params)
        samples, group_ids, rewards = [], [], []
        for g, (problem, group) in enumerate(zip(problems, groups, strict=True)):
            for sample in group:
                text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
                samples.append(sample)
                group_ids.append(g)
                rewards.append(reward(text, problem.answer, cfg.task.reward_correct, cfg.task.reward_wrong))
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
        prompts = [self.tokenizer.encode(p.prompt) for p in self.eval_problems]
        groups = self.rollout_engine.generate(prompts, params)
        correct = [
            reward(self.tokenizer.decode(g[0].response_ids, skip_special_tokens=True), p.answer) > 0
            for p, g in zip(self.eval_problems, groups, strict=True)
        ]
        accuracy = sum(correct) / len(correct)
        if self.state.best_eval_accuracy is None or accuracy > self.state.best_eval_accuracy:
            self.state.best_eval_accuracy = accuracy
        return {"eval/accuracy": accuracy, "time/eval": time.perf_counter() - start}

    def save(self) -> Path:
        extra = {}
        if self.train_engine.scaler is not None:
            extra["grad_scaler"] = self.train_engine.scaler.state_dict()
        return self.checkpoints.save(
            self.state, self.model, self.tokenizer, self.train_engine.optimizer, to_yaml(self.cfg), extra
        )

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
    """Run a whole training job from a config, then write plots and the report."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    trainer = Trainer(cfg)
    last = trainer.fit()
    from nemo_dppo.plots import plot_run, write_report

    plot_run(trainer.run_dir)
    report = write_report(trainer.run_dir)
    trainer.console.print(f"run directory: {trainer.run_dir}  (report: {report})")
    return last


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
