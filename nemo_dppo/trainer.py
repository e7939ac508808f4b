"""The single-node RL loop: rollout (μ) → [log π_old] → mini-batch updates with the policy loss → weight sync.

Per step: `prompts_per_step` prompts × `rollout.n` samples; group-relative advantages; the batch is split into
`train.mini_batches` optimizer steps (the paper: 8), so every mini-batch after the first is off-policy with
respect to μ — exactly the regime the trust region is for. The loop names no backend: engines come from
`nemo_dppo.engines` by name and are used only through their protocols (`engines/base.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from rich.console import Console

from nemo_dppo.advantages import compute_advantages
from nemo_dppo.batching import RolloutBatch, collate_rollouts
from nemo_dppo.checkpoint import CheckpointManager, TrainerState, set_rng_state
from nemo_dppo.config import Config, to_yaml
from nemo_dppo.engines import make_rollout_engine, make_training_engine
from nemo_dppo.engines.base import SamplingParams
from nemo_dppo.errors import UserError
from nemo_dppo.evaluate import encode_prompt, pass_at_k
from nemo_dppo.losses import get_mode
from nemo_dppo.megatron.job import Job
from nemo_dppo.run_control import NoLogger, average_metrics, progress_bar, stop_signals, timed
from nemo_dppo.run_logger import RunLogger
from nemo_dppo.step_metrics import DroppedTokenLog, DroppedTokens, count_dropped, on_policy_metrics
from nemo_dppo.tasks import Problem, make_task
from nemo_dppo.warm_start import warm_started_model_dir


class Trainer:
    """The RL loop. In a multi-rank job every rank builds one (its shard of the policy); rank 0 alone owns the
    rollout engine, evaluation, logging and checkpoint writing, and broadcasts each step's rollout batch."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.console = Console(stderr=True)
        self.mode = get_mode(cfg.loss.mode)
        self.topk = int(cfg.rollout.logprobs_topk or 0)  # resolved once, by the config
        self.recompute = self.mode.needs_old_logprobs or cfg.train.recompute_old_logprobs == "always"
        self.job = Job.start(cfg)  # joins the process group of a multi-rank job (one rank: no-op)
        main = self.job.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints) if main else None
        self.state = TrainerState(step=0)
        resume_from = self.job.share(self.checkpoints.latest() if cfg.resume and self.checkpoints else None)
        torch.manual_seed(cfg.seed)
        initial_dir = self.job.share(Trainer.initial_model_dir(cfg) if main else None)
        model_dir = resume_from / "model" if resume_from is not None else initial_dir
        self.train_engine = make_training_engine(cfg, model_dir)
        self.tokenizer = _load_tokenizer(model_dir) if main else None
        if self.tokenizer is not None and self.topk > len(self.tokenizer):
            raise UserError(f"rollout.logprobs_topk={self.topk} exceeds the vocabulary size {len(self.tokenizer)}")
        self.rollout_engine = make_rollout_engine(cfg, model_dir, self.tokenizer, self.topk) if main else None
        self.resumed_from = resume_from
        if resume_from is not None:
            self._resume(resume_from)
        self.task = make_task(cfg.task, curated_dir=initial_dir if cfg.model.path is None else None)
        # Math prompts go through the model's chat template when it has one (as `nemo-dppo eval` does).
        self.use_chat_template = cfg.task.name == "math" and bool(getattr(self.tokenizer, "chat_template", None))
        self.train_problems = self.task.all_problems("train")
        self.eval_problems = self.task.all_problems("eval")[: cfg.task.num_eval_prompts]
        if main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.dropped_log: DroppedTokenLog | None = None  # opened by fit()
        self._stop_signal: str | None = None

    def _resume(self, checkpoint: Path) -> None:
        self.state, payload = CheckpointManager.load_state(checkpoint)
        self.train_engine.load_checkpoint(checkpoint, payload)
        if self.job.is_main:
            set_rng_state(payload["rng"])
            self.console.print(f"resumed from {checkpoint} (step {self.state.step})")

    @staticmethod
    def initial_model_dir(cfg: Config) -> Path:
        """`model.path`, or the cached warm-started tiny policy (trained on first use)."""
        if cfg.model.path is not None:
            return Path(cfg.model.path).expanduser()
        return warm_started_model_dir(cfg.model, cfg.task, cfg.warm_start)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until `cfg.steps` (or a stop signal); returns the last step's metrics (on the main rank)."""
        cfg, main = self.cfg, self.job.is_main
        last: dict[str, float] = {}
        resume_step = self.state.step if self.resumed_from is not None else -1  # -1: a fresh run
        self.dropped_log = DroppedTokenLog(self.run_dir, resume_step) if main else None
        logger = RunLogger(self.run_dir, resume_from_step=resume_step) if main else NoLogger()
        with stop_signals(self.request_stop), logger as log, progress_bar(cfg.progress and main, self.console) as bar:
            task_id = bar.add_task("DPPO", total=cfg.steps, completed=self.state.step, reward=float("nan"))
            if self.state.step == 0 and main:
                log.log(0, self.evaluate())
            while self.state.step < cfg.steps and not self.job.any(self._stop_signal is not None):
                step = self.state.step + 1
                last = self.train_one_step(step)
                if main and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last.update(self.evaluate())
                self.state.step = step
                log.log(step, last)
                bar.update(task_id, advance=1, reward=last.get("reward/mean", float("nan")))
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
        with timed(timings, "step"):
            with timed(timings, "rollout"):
                shared = self.job.share(self.rollout(self._prompts_for_step(step), step) if self.job.is_main else None)
                batch, rollout_metrics = shared
            on_policy: dict[str, float] = {}
            if self.recompute:
                with timed(timings, "logprob"):
                    old = self.train_engine.compute_logprobs(batch)
                    batch = replace(batch, old_logprobs=old.token.logprobs)
                    on_policy = on_policy_metrics(batch, old)
            with timed(timings, "train"):
                train_metrics, dropped, first = self.update(batch, step)
            on_policy = on_policy or on_policy_metrics(first[0], first[1])  # no recompute: the first mini-batch
            with timed(timings, "sync"):
                weights = self.train_engine.hf_state_dict()  # collective on a multi-rank job
                if self.rollout_engine is not None:
                    self.rollout_engine.sync_weights(weights)
        if self.dropped_log is not None:
            self.dropped_log.log(step, self._decoded_counts(dropped.ids))
        return {
            **rollout_metrics,
            **on_policy,
            **{f"loss/{k}": v for k, v in train_metrics.items()},
            **dropped.metrics(),
            **{f"time/{k}": v for k, v in timings.items()},  # rollout, logprob, train, sync, then step
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
        groups = self.rollout_engine.generate([self._encode(p.prompt) for p in problems], params)
        samples, group_ids, rewards = [], [], []
        for g, (problem, group) in enumerate(zip(problems, groups, strict=True)):
            for sample in group:
                text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
                samples.append(sample)
                group_ids.append(g)
                rewards.append(self.task.reward(text, problem.answer, cfg.task.reward_correct, cfg.task.reward_wrong))
        reward_tensor = torch.tensor(rewards)
        advantages = compute_advantages(
            cfg.advantage.estimator, reward_tensor, torch.tensor(group_ids), cfg.advantage.eps
        )
        batch = collate_rollouts(samples, group_ids, rewards, advantages, self.rollout_engine.pad_id)
        lengths = batch.response_mask.sum(-1).float()
        return batch, {
            "reward/mean": float(reward_tensor.mean()),
            "reward/accuracy": float((reward_tensor == cfg.task.reward_correct).float().mean()),
            "response/length_mean": float(lengths.mean()),
            "response/mu_mean": float(batch.rollout_logprobs[batch.response_mask].exp().mean()),
            "response/truncated_frac": float(sum(not s.finished for s in samples) / len(samples)),
        }

    def update(self, batch: RolloutBatch, step: int) -> tuple[dict[str, float], DroppedTokens, tuple]:
        """`train.mini_batches` optimizer steps over a seeded shuffle of the batch; metrics averaged. Also returns
        the dropped tokens and (first mini-batch, its forward): taken before any update, that forward is π_old."""
        n = batch.num_sequences
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + step))
        size = n // self.cfg.train.mini_batches
        dropped = DroppedTokens()
        per_minibatch, first = [], None
        for i in range(0, n, size):
            minibatch = batch.select(order[i : i + size])
            result = self.train_engine.train_step(minibatch, self.cfg.loss)
            first = first or (minibatch, result.forward)
            count_dropped(dropped, minibatch, result.forward, self.cfg.loss)
            per_minibatch.append(result.metrics)
        assert first is not None
        return average_metrics(per_minibatch), dropped, first

    def _decoded_counts(self, ids: Counter) -> dict[str, int]:
        return {self.tokenizer.convert_ids_to_tokens(int(i)): c for i, c in ids.most_common()}

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out prompts; with `eval.k`, avg@k and pass@k of k samples at the rollout
        temperature."""
        cfg = self.cfg
        timings: dict[str, float] = {}
        prompts = [self._encode(p.prompt) for p in self.eval_problems]
        with timed(timings, "eval"):
            greedy = SamplingParams(n=1, max_new_tokens=cfg.rollout.max_new_tokens, greedy=True)
            correct = [c[0] for c in self._score(self.rollout_engine.generate(prompts, greedy))]
            metrics = {"eval/accuracy": sum(correct) / len(correct)}
            if cfg.eval.k:
                sampled = replace(greedy, n=cfg.eval.k, greedy=False, temperature=cfg.rollout.temperature,
                                  top_p=cfg.rollout.top_p, seed=cfg.seed + 7_777_777)  # fmt: skip
                counts = [sum(c) for c in self._score(self.rollout_engine.generate(prompts, sampled))]
                k = cfg.eval.k
                metrics[f"eval/avg@{k}"] = sum(counts) / (k * len(counts))
                metrics[f"eval/pass@{k}"] = sum(pass_at_k(k, c, k) for c in counts) / len(counts)
        if self.state.best_eval_accuracy is None or metrics["eval/accuracy"] > self.state.best_eval_accuracy:
            self.state.best_eval_accuracy = metrics["eval/accuracy"]
        return {**metrics, "time/eval": timings["eval"]}

    def _score(self, groups: list) -> list[list[bool]]:
        return [
            [self.task.reward(self.tokenizer.decode(s.response_ids, skip_special_tokens=True), p.answer) > 0
             for s in group]
            for p, group in zip(self.eval_problems, groups, strict=True)
        ]  # fmt: skip

    def save(self) -> Path:
        """Collective on a multi-rank job: every rank writes its part, the main rank publishes the step."""
        return self.train_engine.save_checkpoint(self.checkpoints, self.state, self.tokenizer, to_yaml(self.cfg))

    def _encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.use_chat_template)

    def close(self) -> None:
        """Free the rollout engine and leave the job's process group (lets tests build several jobs)."""
        if self.rollout_engine is not None:
            self.rollout_engine.close()
        self.job.close()

    def request_stop(self, name: str) -> None:
        self._stop_signal = name


def train(cfg: Config) -> dict[str, float]:
    """Run a whole training job from a config, then write plots and the report.

    A layout of several ranks starts them on this machine first (`Job.launch`) unless this process already is
    one of them; the launcher returns the main rank's last metrics.
    """
    if Job.needs_launch(cfg):
        return Job.launch(cfg, _initial_model_dir=lambda: Trainer.initial_model_dir(cfg))
    Job.precheck(cfg, lambda: Trainer.initial_model_dir(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    trainer = Trainer(cfg)
    try:
        last = trainer.fit()
        if trainer.job.is_main and cfg.plots:
            from nemo_dppo.plots import plot_run, write_report

            plot_run(trainer.run_dir)
            report = write_report(trainer.run_dir)
            trainer.console.print(f"run directory: {trainer.run_dir}  (report: {report})")
    finally:
        trainer.close()
    return last


def _load_tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """The policy's tokenizer; no code from the directory runs (`trust_remote_code=False`)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer from {model_dir}: {err}") from None
