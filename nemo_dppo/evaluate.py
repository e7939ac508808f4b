"""`nemo-dppo eval`: avg@k / pass@k of a checkpoint on a prompt file (AIME 24 / 25), with a rollout engine.

    result = run_eval("runs/dapo", "data/aime_2024.jsonl", k=32, max_new_tokens=8192)
    print(result.summary())        # avg@32 = 0.3021 ... → runs/dapo/eval/step_000200-aime_2024-k32/result.{json,md}

- CHECKPOINT: an HF model directory (has `config.json`), a run checkpoint `RUN_DIR/checkpoints/step_N` (its
  `model/` subdirectory) or a run directory (its `checkpoints/latest`, read without touching the run: an eval can
  run beside a training job).
- Sampling as in the paper's evaluation: `k` samples per problem at temperature 1.0, top-p 1.0; `max_new_tokens`
  is a setting. Each engine call takes `batch_size` prompts × k samples with seed `seed * 1_000_003 + batch index`,
  so a result is reproducible for the same settings (batch size included).
- Metrics: avg@k = mean over problems of (correct samples / k) — the paper's AIME metric; pass@k = fraction of
  problems with at least one correct sample; unbiased pass@j for j = 1, 2, 4, ... ≤ k; mean response length in
  tokens (EOS included), truncated fraction. Correct = reward > 0 (`MathReward`: last boxed answer, math-verify).
- Output: `result.json` (settings, metrics, per-problem pass counts), `result.md` (the same as tables) and, with
  `save_responses`, `responses.jsonl` (every decoded sample and its verdict).
- Engines are the rollout engines of `nemo_dppo.engines` by the same names as in training (`hf`, `vllm`);
  `ENGINE_FACTORIES` adapts each to an evaluation's settings, and `register_engine(name, factory)` or the
  `engine_factory` argument plug in another `RolloutEngine` without touching this module.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nemo_dppo.checkpoint import latest_intact, verify_checkpoint
from nemo_dppo.data.prepare import load_problems
from nemo_dppo.data.records import MathRecord
from nemo_dppo.engines.base import RolloutEngine, SamplingParams
from nemo_dppo.errors import UserError

#: (model directory, settings) → (engine, tokenizer). The tokenizer encodes prompts and decodes responses.
EngineFactory = Callable[[Path, "EvalSettings"], tuple[RolloutEngine, Any]]
#: (decoded response, reference answer) → reward; a sample is correct when the reward is > 0.
RewardFn = Callable[[str, str], float]

DTYPES = ("fp32", "bf16", "fp16")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines an evaluation's samples (recorded in the result)."""

    k: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    batch_size: int = 8
    dtype: str = "bf16"
    engine: str = "hf"
    chat_template: str = "auto"
    reward_timeout_s: float = 5.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError(
                f"k={self.k}, max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1"
            )
        if not self.temperature > 0:
            raise UserError(f"temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise UserError(f"chat_template={self.chat_template!r} is not one of {', '.join(CHAT_TEMPLATE_MODES)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit} must be >= 1")


# ----------------------------------------------------------------------------------------------- engines
def hf_engine_factory(model_dir: Path, settings: EvalSettings) -> tuple[RolloutEngine, Any]:
    """`HFRolloutEngine` on `model_dir` (Qwen3-MoE through the project loader, other causal LMs through Auto*)."""
    import transformers

    from nemo_dppo.engines.hf_rollout import HFRolloutEngine

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        engine = HFRolloutEngine(str(model_dir), dtype=settings.dtype)
    except ValueError as err:
        if "Qwen3-MoE" not in str(err):
            raise UserError(f"cannot load the model in {model_dir}: {err}") from None
        engine = _auto_engine(model_dir, settings)
    except OSError as err:
        raise UserError(f"cannot load the model in {model_dir}: {err}") from None
    return engine, engine.tokenizer


def _auto_engine(model_dir: Path, settings: EvalSettings) -> RolloutEngine:
    """Any other causal LM through Auto*: safetensors only, and no code from the directory (`auto_map`) runs."""
    import transformers

    from nemo_dppo.engines.hf_rollout import HFRolloutEngine
    from nemo_dppo.models.tiny_moe import resolve_dtype

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=resolve_dtype(settings.dtype), use_safetensors=True, trust_remote_code=False
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except ValueError as err:
        raise UserError(f"cannot load the model in {model_dir}: {str(err).splitlines()[0]}") from None
    return HFRolloutEngine(model, tokenizer, dtype=settings.dtype)


def vllm_engine_factory(model_dir: Path, settings: EvalSettings) -> tuple[RolloutEngine, Any]:
    """The training loop's in-process vLLM rollout engine, on `model_dir` in `settings.dtype`."""
    from nemo_dppo.engines import ROLLOUT_ENGINES, engine_class
    from nemo_dppo.engines.vllm_internals import VLLMUnavailableError

    try:
        engine = engine_class(ROLLOUT_ENGINES, "vllm", "rollout")(str(model_dir), dtype=settings.dtype,
                                                                   seed=settings.seed)  # fmt: skip
    except VLLMUnavailableError as err:
        raise UserError(str(err)) from None
    return engine, engine.tokenizer


#: One factory per name of `nemo_dppo.engines.ROLLOUT_ENGINES` (the table training uses).
ENGINE_FACTORIES: dict[str, EngineFactory] = {"hf": hf_engine_factory, "vllm": vllm_engine_factory}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make `engine=name` available (e.g. a vLLM engine factory)."""
    ENGINE_FACTORIES[name] = factory


# ------------------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the weights are, and the run / step they belong to (None for a plain HF directory)."""

    model_dir: Path
    run_dir: Path | None = None
    step: str | None = None


def resolve_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """HF model dir, run checkpoint (`.../checkpoints/step_N`, uses `model/`) or run dir (uses `checkpoints/latest`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / "config.json").is_file():
        return ResolvedCheckpoint(path)
    if (path / "model" / "config.json").is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise UserError(
                f"checkpoint {path} is not intact ({problem}; still being written?); "
                f"pass {path / 'model'} to evaluate its weights anyway"
            )
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return ResolvedCheckpoint(path / "model", run_dir, path.name)
    root = path / "checkpoints"
    if root.is_dir():
        latest = latest_intact(root)  # read-only: an eval can run beside the training job
        if latest is None:
            raise UserError(f"run directory {path} has no complete checkpoint under {root}")
        return ResolvedCheckpoint(latest / "model", path, latest.name)
    raise UserError(
        f"{path} is not an HF model directory (no config.json), a run checkpoint (no model/config.json) "
        "or a run directory (no checkpoints/)"
    )


# ----------------------------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _pass_ks(k: int) -> list[int]:
    ks = [1 << i for i in range(k.bit_length()) if 1 << i <= k]
    return ks if ks[-1] == k else [*ks, k]


@dataclass
class ProblemResult:
    """One problem's outcome over its k samples."""

    id: str
    source: str
    expected_answer: str
    num_correct: int
    num_samples: int
    mean_response_length: float
    num_truncated: int


@dataclass
class EvalResult:
    """What `run_eval` measured and where it wrote it."""

    checkpoint: str
    model_dir: str
    data: str
    settings: dict[str, Any]
    metrics: dict[str, Any]
    problems: list[ProblemResult]
    seconds: float
    created: str
    out_dir: Path | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("out_dir")
        return out

    def summary(self) -> str:
        k = self.settings["k"]
        m = self.metrics
        where = f" → {self.out_dir}/result.{{json,md}}" if self.out_dir is not None else ""
        return (
            f"avg@{k} = {m['avg_at_k']:.4f}  pass@{k} = {m['pass_at_k']:.4f}  "
            f"({m['num_problems']} problems × {k} samples, mean length {m['mean_response_length']:.1f} tokens, "
            f"{m['seconds_per_problem']:.1f} s/problem){where}"
        )


def compute_metrics(problems: Sequence[ProblemResult], k: int) -> dict[str, Any]:
    """avg@k, pass@k, unbiased pass@j, response length and truncation over per-problem results."""
    if not problems:
        raise ValueError("no problems")
    accuracy = [p.num_correct / p.num_samples for p in problems]
    mean = sum(accuracy) / len(accuracy)
    var = sum((a - mean) ** 2 for a in accuracy) / max(1, len(accuracy) - 1)
    samples = sum(p.num_samples for p in problems)
    return {
        "k": k,
        "num_problems": len(problems),
        "num_samples": samples,
        "avg_at_k": mean,
        "avg_at_k_stderr": math.sqrt(var / len(accuracy)) if len(accuracy) > 1 else 0.0,
        "pass_at_k": sum(p.num_correct > 0 for p in problems) / len(problems),
        "pass_at": {
            str(j): sum(pass_at_k(p.num_samples, p.num_correct, j) for p in problems) / len(problems)
            for j in _pass_ks(k)
        },
        "mean_response_length": sum(p.mean_response_length * p.num_samples for p in problems) / samples,
        "truncated_frac": sum(p.num_truncated for p in problems) / samples,
    }


# -------------------------------------------------------------------------------------------------- eval
def encode_prompt(tokenizer: Any, text: str, use_chat_template: bool) -> list[int]:
    """Token ids of one prompt: the tokenizer's chat template (one user turn + generation prompt) or plain."""
    if use_chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text))


def _problems(data: str | Path, limit: int | None) -> list:
    problems = load_problems(data)
    if limit is not None:
        problems = problems[:limit]
    if not problems:
        raise UserError(f"{data}: no problems to evaluate")
    return problems


def _named_factory(engine: str) -> EngineFactory:
    if engine not in ENGINE_FACTORIES:
        raise UserError(f"engine={engine!r} is not one of {', '.join(sorted(ENGINE_FACTORIES))}")
    return ENGINE_FACTORIES[engine]


def _use_chat_template(settings: EvalSettings, tokenizer: Any, model_dir: Path) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat_template == "on" and not has_template:
        raise UserError(f"chat_template=on, but the tokenizer of {model_dir} has no chat template")
    return settings.chat_template == "on" or (settings.chat_template == "auto" and has_template)


def _result(checkpoint: str | Path, resolved: ResolvedCheckpoint, data: str | Path, settings: EvalSettings,
            engine_name: str, use_chat: bool, own_reward: Any, results: list[ProblemResult], start: float,
            sampling_start: float) -> EvalResult:  # fmt: skip
    """The evaluation's record: settings as run, metrics (+ seconds per problem, reward time-outs), timing."""
    end = time.perf_counter()
    seconds = end - start
    metrics = compute_metrics(results, settings.k)
    metrics["seconds_per_problem"] = (end - sampling_start) / len(results)  # sampling + scoring, no model load
    if own_reward is not None:
        metrics["reward_timeouts"] = own_reward.timeouts
    result = EvalResult(
        checkpoint=str(checkpoint),
        model_dir=str(resolved.model_dir),
        data=str(data),
        settings={
            **asdict(settings),
            "engine": engine_name,
            "chat_template_used": use_chat,
            "reward": "custom" if own_reward is None else "math_verify_boxed",
        },
        metrics=metrics,
        problems=results,
        seconds=seconds,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return result


def run_eval(
    checkpoint: str | Path,
    data: str | Path,
    *,
    k: int = 32,
    max_new_tokens: int = 4096,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str = "bf16",
    engine: str = "hf",
    chat_template: str = "auto",
    reward_timeout_s: float = 5.0,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    write: bool = True,
    save_responses: bool = False,
    engine_factory: EngineFactory | None = None,
    reward_fn: RewardFn | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> EvalResult:
    """Sample `k` responses per problem of `data` from `checkpoint` and score them (see the module docstring).

    `engine_factory` overrides `engine`; `reward_fn` overrides the math reward (a sample is correct when > 0).
    With `write`, the result goes to `out_dir` (default: RUN_DIR/eval/STEP-DATA-kK for run checkpoints,
    eval_results/MODEL-DATA-kK otherwise).
    """
    settings = EvalSettings(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            batch_size=batch_size, dtype=dtype, engine=engine, chat_template=chat_template,
                            reward_timeout_s=reward_timeout_s, limit=limit)  # fmt: skip
    resolved = resolve_checkpoint(checkpoint)
    problems = _problems(data, limit)
    engine_name = engine if engine_factory is None else getattr(engine_factory, "__name__", "custom")
    engine_factory = engine_factory or _named_factory(engine)
    console = console or Console(stderr=True)
    start = time.perf_counter()
    rollout_engine, tokenizer = engine_factory(resolved.model_dir, settings)
    sampling_start = time.perf_counter()
    use_chat = _use_chat_template(settings, tokenizer, resolved.model_dir)
    own_reward = None
    if reward_fn is None:
        from nemo_dppo.rewards.math_reward import MathReward

        own_reward = MathReward(timeout_s=settings.reward_timeout_s)
        reward_fn = own_reward
    try:
        results, responses = _sample_and_score(
            problems, rollout_engine, tokenizer, settings, use_chat, reward_fn, save_responses, progress, console
        )
    finally:
        if own_reward is not None:
            own_reward.close()
    result = _result(checkpoint, resolved, data, settings, engine_name, use_chat, own_reward, results,
                     start, sampling_start)  # fmt: skip
    if write:
        target = Path(out_dir) if out_dir is not None else default_out_dir(resolved, data, settings.k)
        write_result(result, target, responses if save_responses else None)
    return result


def _sample_and_score(
    problems: Sequence[MathRecord],
    engine: RolloutEngine,
    tokenizer: Any,
    settings: EvalSettings,
    use_chat: bool,
    reward_fn: RewardFn,
    keep_responses: bool,
    progress: bool,
    console: Console,
) -> tuple[list[ProblemResult], list[dict[str, Any]]]:
    results: list[ProblemResult] = []
    responses: list[dict[str, Any]] = []
    correct_total = 0
    with _progress_bar(progress, console, len(problems), settings.k) as update:
        for batch_index, start in enumerate(range(0, len(problems), settings.batch_size)):
            batch = problems[start : start + settings.batch_size]
            params = SamplingParams(
                n=settings.k,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                seed=settings.seed * _SEED_STRIDE + batch_index,
            )
            prompt_ids = [encode_prompt(tokenizer, p.prompt, use_chat) for p in batch]
            groups = engine.generate(prompt_ids, params)
            if len(groups) != len(batch) or any(len(g) != settings.k for g in groups):
                raise RuntimeError(
                    f"engine returned {[len(g) for g in groups]} samples for {len(batch)} × {settings.k}"
                )
            for problem, group in zip(batch, groups, strict=True):
                num_correct, lengths, truncated = 0, [], 0
                for index, sample in enumerate(group):
                    text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
                    ok = bool(reward_fn(text, problem.answer) > 0)
                    num_correct += ok
                    lengths.append(int(sample.response_ids.numel()))
                    truncated += not sample.finished
                    if keep_responses:
                        responses.append(
                            {"id": problem.id, "sample": index, "correct": ok, "length": lengths[-1], "text": text}
                        )
                correct_total += num_correct
                results.append(
                    ProblemResult(
                        id=problem.id,
                        source=problem.source,
                        expected_answer=problem.answer,
                        num_correct=num_correct,
                        num_samples=len(group),
                        mean_response_length=sum(lengths) / len(lengths),
                        num_truncated=truncated,
                    )
                )
            update(len(batch), correct_total / (len(results) * settings.k))
    return results, responses


@contextmanager
def _progress_bar(enabled: bool, console: Console, total: int, k: int) -> Iterator[Callable[[int, float], None]]:
    bar = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"avg@{k} {{task.fields[avg]:.4f}}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
    with bar:
        task = bar.add_task("problems", total=total, avg=0.0)
        yield lambda n, avg: bar.update(task, advance=n, avg=avg)


# ------------------------------------------------------------------------------------------------ output
def default_out_dir(resolved: ResolvedCheckpoint, data: str | Path, k: int) -> Path:
    """RUN_DIR/eval/STEP-DATA-kK for run checkpoints, eval_results/MODEL-DATA-kK for plain model directories."""
    name = Path(data).stem
    if resolved.run_dir is not None and resolved.step is not None:
        return resolved.run_dir / "eval" / f"{resolved.step}-{name}-k{k}"
    return Path("eval_results") / f"{resolved.model_dir.resolve().name}-{name}-k{k}"


def write_result(result: EvalResult, out_dir: str | Path, responses: list[dict[str, Any]] | None = None) -> Path:
    """result.json, result.md (and responses.jsonl) into `out_dir`; sets `result.out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    (out / "result.md").write_text(render_markdown(result))
    if responses is not None:
        with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
            for row in responses:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result.out_dir = out
    return out


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(result: EvalResult) -> str:
    """The result as Markdown: headline metrics, settings, per-problem pass counts."""
    k, m = result.settings["k"], result.metrics
    lines = [
        f"# Evaluation of `{result.model_dir}`",
        "",
        f"Data `{result.data}`: {m['num_problems']} problems × {k} samples, {result.seconds:.1f} s ({result.created}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| avg@{k} | {m['avg_at_k']:.4f} ± {m['avg_at_k_stderr']:.4f} (s.e.) |",
        f"| pass@{k} | {m['pass_at_k']:.4f} |",
        *(f"| pass@{j} (unbiased) | {v:.4f} |" for j, v in m["pass_at"].items() if int(j) != k),
        f"| mean response length | {m['mean_response_length']:.1f} tokens |",
        f"| truncated at max_new_tokens | {m['truncated_frac']:.2%} |",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {_cell(key)} | {_cell(value)} |" for key, value in result.settings.items()),
        "",
        "## Per problem",
        "",
        f"| id | answer | correct / {k} | mean length | truncated |",
        "|---|---|---|---|---|",
        *(
            f"| {_cell(p.id)} | {_cell(p.expected_answer)} | {p.num_correct} / {p.num_samples} | "
            f"{p.mean_response_length:.1f} | {p.num_truncated} |"
            for p in result.problems
        ),
        "",
    ]
    return "\n".join(lines)
