"""nemo-dppo's RL step against TRL's `GRPOTrainer` on the same tiny Qwen3-MoE, prompts and batch shape, in one run.

    python tools/bench_vs_trl.py [CONFIG.yaml] [--steps 5] [--warmup 1] [--threads 1] [--trl-precision fp32]
                                 [key=value ...]

Needs TRL beside nemo-dppo (`pip install -c constraints-cpu.txt -e ".[bench]"`, or a venv made with
`--system-site-packages` holding only `trl`); without it the script prints one line and exits with status 2.

Both sides start from the config's initial policy (`Trainer.initial_model_dir`, the warm-started tiny model of
the default config) and see the same prompts in the same order (nemo-dppo's training prompts of steps 1, 2, ...),
`rollout.n` samples per prompt, `rollout.max_new_tokens`, temperature / top-p, no KL, the task's reward, and
`train.mini_batches` optimizer steps per RL step (TRL: `steps_per_generation = train.mini_batches`,
`per_device_train_batch_size = prompts_per_step * n / mini_batches`, `gradient_accumulation_steps = 1`,
`num_iterations = 1`). They run in this process with the same torch thread count, their RL steps alternating
(TRL's k-th, then nemo-dppo's k-th; never at the same time), so that changes in machine load hit both alike; the
first `--warmup` RL steps of each are not measured. Phases (seconds per RL step, median over the measured steps):

- rollout: sampling + decoding + reward + advantages (TRL: `_generate_and_score_completions` less its π_old pass)
- generate: the HF `model.generate` call alone (inside rollout), and the tokens it produced (up to EOS)
- logprob: the no-grad π_old pass (TRL computes it whenever `steps_per_generation > 1`; nemo-dppo only when the
  loss mode reads π_old or `train.recompute_old_logprobs=always`)
- train: the `train.mini_batches` optimizer steps (TRL: the rest of its RL step)
- sync: trainer → rollout weight copy (nemo-dppo only; TRL samples from the training model itself)
- step: wall time of the whole RL step

Wall-clock figures on a shared machine are noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PHASES = ("rollout", "generate", "logprob", "train", "sync", "step")
INSTALL_HINT = 'pip install -c constraints-cpu.txt -e ".[bench]"'


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="nemo-dppo config (default: conf/tiny_cpu.yaml)")
    parser.add_argument("--steps", type=int, default=5, help="measured RL steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="RL steps run first and not measured")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both sides")
    parser.add_argument(
        "--trl-precision", choices=("fp32", "bf16"), default="fp32",
        help="TRL's `bf16` flag (fp32: fp32 training and sampling, as nemo-dppo's fp32 trainer)",
    )  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        overrides, args.config = [args.config, *overrides], None  # no config file, only key=value overrides
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
    return args, overrides


def import_trl() -> Any:
    """The `trl` module, or one line on stderr and exit status 2."""
    try:
        import trl
    except ImportError as err:
        print(f"bench_vs_trl: TRL is not installed ({err}); install it with: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    return trl


# ------------------------------------------------------------------------------------------------ instrumentation
class GenerateMeter:
    """Wraps `model.generate` of one model object: time per call and generated tokens up to and including EOS."""

    def __init__(self, model: Any, eos_id: int) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0
        original = model.generate
        meter = self

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            meter.seconds += time.perf_counter() - start
            meter.calls += 1
            sequences = out if hasattr(out, "dim") else out.sequences
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            meter.tokens += count_generated(sequences[:, input_ids.shape[1] :], eos_id)
            return out

        model.generate = generate

    def take(self) -> tuple[float, int]:
        seconds, tokens = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return seconds, tokens


def count_generated(generated: Any, eos_id: int) -> int:
    """Tokens of each row up to and including its first EOS (all of them when there is none)."""
    import torch

    is_eos = generated == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, generated.shape[1], dtype=torch.int64)
    )
    return int(first.sum())


def timed_method(obj: Any, name: str, sink: Callable[[float, tuple, dict], None]) -> None:
    """Replace the bound method `obj.name` by one that reports (seconds, args, kwargs) of every call to `sink`."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink(time.perf_counter() - start, args, kwargs)

    setattr(obj, name, wrapper)


# ------------------------------------------------------------------------------------------------ nemo-dppo
class NemoSide:
    """`nemo-dppo train`'s RL step (`Trainer.train_one_step`, without eval / checkpoints), one step per call."""

    def __init__(self, cfg: Any) -> None:
        from nemo_dppo.trainer import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg)
        engine = self.trainer.rollout_engine
        hf_model = getattr(engine, "model", None)  # rollout.engine=vllm has no HF generate to time
        self.meter = GenerateMeter(hf_model, engine.eos_id) if hasattr(hf_model, "generate") else None
        self.steps: list[dict[str, float]] = []

    def prompts(self, total_steps: int) -> list[list[Any]]:
        """The training prompts of steps 1..total_steps (they depend only on the seed and the step)."""
        return [self.trainer._prompts_for_step(step) for step in range(1, total_steps + 1)]

    def step(self) -> None:
        step = len(self.steps) + 1
        start, cpu = time.perf_counter(), time.process_time()
        metrics = self.trainer.train_one_step(step)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        gen_s, tokens = self.meter.take() if self.meter is not None else (0.0, 0)
        samples = self.cfg.train.prompts_per_step * self.cfg.rollout.n
        self.steps.append({
            "rollout": metrics["time/rollout"],
            "generate": gen_s,
            "logprob": metrics.get("time/logprob", 0.0),
            "train": metrics["time/train"],
            "sync": metrics["time/sync"],
            "step": wall,
            "cpu": cpu,
            "tokens": float(tokens) if self.meter is not None else metrics["response/length_mean"] * samples,
        })  # fmt: skip

    def close(self) -> None:
        self.trainer.close()


# ------------------------------------------------------------------------------------------------ TRL
def run_trl(
    cfg: Any,
    model_dir: Path,
    prompts: list[list[Any]],
    task: Any,
    out_dir: Path,
    precision: str,
    between: Callable[[], None] = lambda: None,
) -> list[dict[str, float]]:
    """The same RL steps with TRL's GRPOTrainer (transformers generate, no vLLM); `between()` runs after each RL
    step, outside its timing (the other side's step, so that both see the same machine load)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from nemo_dppo.evaluate import encode_prompt
    from nemo_dppo.models.tiny_moe import load_model_dir

    model, tokenizer = load_model_dir(str(model_dir), "fp32")
    mini_batches, n = cfg.train.mini_batches, cfg.rollout.n
    batch = cfg.train.prompts_per_step * n
    if batch % mini_batches:
        raise SystemExit(f"bench_vs_trl: prompts_per_step × n = {batch} is not divisible by mini_batches")
    flat = [p for step_prompts in prompts for p in step_prompts]
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in flat], "answer": [p.answer for p in flat]})

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [
            task.reward(c, a, cfg.task.reward_correct, cfg.task.reward_wrong)
            for c, a in zip(completions, answer, strict=True)
        ]

    args = GRPOConfig(
        output_dir=str(out_dir),
        num_generations=n,
        per_device_train_batch_size=batch // mini_batches,
        gradient_accumulation_steps=1,
        steps_per_generation=mini_batches,  # one generation batch of prompts_per_step × n per `mini_batches` steps
        num_iterations=1,
        max_steps=len(prompts) * mini_batches,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        beta=0.0,
        scale_rewards="none",  # A = r - mean of the group, as nemo-dppo's dr_grpo estimator
        loss_type="dapo",  # token-level mean over the mini-batch, as loss.agg=token-mean
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        adam_beta1=cfg.train.betas[0],
        adam_beta2=cfg.train.betas[1],
        max_grad_norm=cfg.train.grad_clip,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=precision == "bf16",
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig defaults to True; nemo-dppo does not checkpoint
        use_cpu=True,
        use_vllm=False,
        shuffle_dataset=False,  # the prompts in nemo-dppo's order
        seed=cfg.seed,
        report_to=[],
        logging_steps=mini_batches,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    meter = GenerateMeter(trainer.model, tokenizer.eos_token_id)
    acc = {"rollout": 0.0, "logprob": 0.0}

    def rollout_sink(seconds: float, *_: Any) -> None:
        acc["rollout"] += seconds

    def logprob_sink(seconds: float, *_: Any) -> None:
        if not torch.is_grad_enabled():  # the π_old pass; training forwards run with grad
            acc["logprob"] += seconds

    timed_method(trainer, "_generate_and_score_completions", rollout_sink)
    timed_method(trainer, "_get_per_token_logps_and_entropies", logprob_sink)
    steps: list[dict[str, float]] = []

    class RLStepTimer(TrainerCallback):
        """One RL step = `mini_batches` optimizer steps, from the end of the previous one to the end of this one."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            if state.global_step % mini_batches:
                return
            now, cpu = time.perf_counter(), time.process_time()
            gen_s, tokens = meter.take()
            rollout = acc["rollout"] - acc["logprob"]
            steps.append({
                "rollout": rollout,
                "generate": gen_s,
                "logprob": acc["logprob"],
                "train": now - self.last - acc["rollout"],
                "sync": 0.0,
                "step": now - self.last,
                "cpu": cpu - self.last_cpu,
                "tokens": float(tokens),
            })  # fmt: skip
            between()
            acc["rollout"] = acc["logprob"] = 0.0
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

    trainer.add_callback(RLStepTimer())
    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts on stdout
    first_ids = tokenizer(text=[flat[0].prompt])["input_ids"][0]
    if list(first_ids) != encode_prompt(tokenizer, flat[0].prompt, False):
        raise SystemExit("bench_vs_trl: TRL would tokenize the prompts differently from nemo-dppo")
    trainer.train()
    return steps


# ------------------------------------------------------------------------------------------------ report
def summarize(steps: list[dict[str, float]], warmup: int) -> dict[str, float]:
    measured = steps[warmup:]
    out = {k: statistics.median(s[k] for s in measured) for k in (*PHASES, "cpu", "tokens")}
    out["tok_per_s"] = statistics.median(s["tokens"] / s["step"] for s in measured)
    timed = [s["tokens"] / s["generate"] for s in measured if s["generate"] > 0]
    out["gen_tok_per_s"] = statistics.median(timed) if timed else 0.0
    out["step_min"] = min(s["step"] for s in measured)
    out["step_max"] = max(s["step"] for s in measured)
    return out


def ratio(trl: float, nemo: float) -> str:
    if nemo <= 0 or trl <= 0:
        return "—"
    return f"{trl / nemo:.2f}×"


def print_table(nemo: dict[str, float], trl: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("phase")
    table.add_column("nemo-dppo s", justify="right")
    table.add_column("TRL s", justify="right")
    table.add_column("ratio (TRL / nemo-dppo)", justify="right")
    for phase in PHASES:
        cells = [f"{side[phase]:.3f}" if side[phase] > 0 else "—" for side in (nemo, trl)]
        table.add_row(phase, *cells, ratio(trl[phase], nemo[phase]))
    table.add_row(
        "step, CPU time of this process", f"{nemo['cpu']:.3f}", f"{trl['cpu']:.3f}", ratio(trl["cpu"], nemo["cpu"])
    )
    table.add_section()
    table.add_row("generated tokens / step", f"{nemo['tokens']:.0f}", f"{trl['tokens']:.0f}", "")
    table.add_row("generated tokens / s (RL step)", f"{nemo['tok_per_s']:.0f}", f"{trl['tok_per_s']:.0f}",
                  ratio(nemo["tok_per_s"], trl["tok_per_s"]) + " (nemo-dppo / TRL)")  # fmt: skip
    gen = [f"{side['gen_tok_per_s']:.0f}" if side["gen_tok_per_s"] else "—" for side in (nemo, trl)]
    table.add_row("generated tokens / s (generate)", *gen,
                  ratio(nemo["gen_tok_per_s"], trl["gen_tok_per_s"]) + " (nemo-dppo / TRL)")  # fmt: skip
    Console(width=140).print(table)


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    trl = import_trl()
    import torch
    import transformers

    from nemo_dppo.config import DEFAULT_CONFIG, load_config
    from nemo_dppo.trainer import Trainer

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        cfg = load_config(
            args.config or str(DEFAULT_CONFIG),
            [*overrides, f"run_dir={tmp}/nemo", "progress=false", "plots=false", f"threads={args.threads}"],
        )
        model_dir = Trainer.initial_model_dir(cfg)
        shape = (
            f"{cfg.train.prompts_per_step} prompts × {cfg.rollout.n} samples, max_new_tokens "
            f"{cfg.rollout.max_new_tokens}, {cfg.train.mini_batches} optimizer steps per RL step"
        )
        print(f"model {model_dir}; {shape}; {args.warmup} warm-up + {args.steps} measured RL steps, "
              f"{args.threads} thread(s)", flush=True)  # fmt: skip
        nemo_side = NemoSide(cfg)
        try:
            prompts = nemo_side.prompts(total)
            # RL steps alternate, TRL's k-th then nemo-dppo's k-th (never at the same time).
            trl_steps = run_trl(
                cfg, model_dir, prompts, nemo_side.trainer.task, Path(tmp) / "trl", args.trl_precision, nemo_side.step
            )
        finally:
            nemo_side.close()
    if torch.get_num_threads() != args.threads:
        print(f"warning: torch threads changed during the run ({args.threads} → {torch.get_num_threads()})")
    nemo, trl_summary = summarize(nemo_side.steps, args.warmup), summarize(trl_steps, args.warmup)
    title = (
        f"seconds per RL step, median of {args.steps} (after {args.warmup} warm-up); nemo-dppo loss "
        f"{cfg.loss.mode}, rollout {cfg.rollout.dtype}, train {cfg.train.precision} | TRL {trl.__version__} "
        f"GRPOTrainer ({args.trl_precision}), transformers {transformers.__version__}, torch {torch.__version__}"
    )
    print_table(nemo, trl_summary, title)
    print(f"RL step spread (min–max): nemo-dppo {nemo['step_min']:.3f}–{nemo['step_max']:.3f} s, "
          f"TRL {trl_summary['step_min']:.3f}–{trl_summary['step_max']:.3f} s. "
          "Shared machine: other jobs' load lands on both sides; compare the ratio.")  # fmt: skip


if __name__ == "__main__":
    main()
