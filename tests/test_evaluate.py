"""The eval command's implementation: checkpoint resolution, avg@k / pass@k against an independent computation
from the saved files, the math reward through a pluggable engine, determinism, outputs."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from nemo_dppo.checkpoint import write_manifest
from nemo_dppo.data import MathRecord, write_records
from nemo_dppo.engines.base import RolloutSample, SamplingParams
from nemo_dppo.errors import UserError
from nemo_dppo.evaluate import (
    ENGINE_FACTORIES,
    EvalSettings,
    compute_metrics,
    encode_prompt,
    pass_at_k,
    resolve_checkpoint,
    run_eval,
)
from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, save_model_dir
from nemo_dppo.models.tokenizer import build_tokenizer

#: Prompts the tiny character tokenizer can encode (digits, lower-case letters, "+=?" ...).
TOY = [("1+2=", "3"), ("3+4=", "7"), ("5+5=", "10"), ("what is 2+2?", "4"), ("9+0=", "9")]


def contains_answer(text: str, answer: str) -> float:
    """A reward the random tiny model sometimes satisfies (so pass counts are not all zero)."""
    return 1.0 if answer in text else -1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer()
    model = build_tiny_qwen3_moe(TinyMoEConfig(seed=1, initializer_range=0.2), tokenizer)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model_dir(model, tokenizer, str(path))
    return path


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [MathRecord(q, a, "toy", f"toy/{i}", q) for i, (q, a) in enumerate(TOY)]
    return write_records(records, tmp_path_factory.mktemp("data") / "toy.jsonl")


def test_pass_at_k_matches_brute_force() -> None:
    for n, c in [(4, 0), (4, 1), (5, 2), (6, 6), (6, 3)]:
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_avg_at_k_against_saved_files(tmp_path: Path, model_dir: Path, toy_data: Path) -> None:
    k = 8
    out = tmp_path / "out"
    result = run_eval(
        model_dir, toy_data, k=k, max_new_tokens=6, batch_size=2, seed=3, out_dir=out, reward_fn=contains_answer,
        save_responses=True, progress=False,
    )  # fmt: skip
    saved = json.loads((out / "result.json").read_text())
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == len(TOY) * k

    # Independent computation: re-score every saved response text, group by problem.
    answers = {f"toy/{i}": a for i, (_, a) in enumerate(TOY)}
    correct = {pid: 0 for pid in answers}
    lengths = []
    for row in responses:
        ok = contains_answer(row["text"], answers[row["id"]]) > 0
        assert ok == row["correct"]
        correct[row["id"]] += ok
        lengths.append(row["length"])
    assert [p["num_correct"] for p in saved["problems"]] == [correct[f"toy/{i}"] for i in range(len(TOY))]
    avg = sum(c / k for c in correct.values()) / len(TOY)
    assert saved["metrics"]["avg_at_k"] == pytest.approx(avg)
    assert saved["metrics"]["pass_at_k"] == pytest.approx(sum(c > 0 for c in correct.values()) / len(TOY))
    assert saved["metrics"]["pass_at"]["1"] == pytest.approx(avg)  # unbiased pass@1 is avg@k
    assert saved["metrics"]["mean_response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert 0 < sum(correct.values()) < len(TOY) * k, "fixture too easy / too hard to test the counting"
    assert 1 <= max(lengths) <= 6
    assert saved["settings"] | {"k": k, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6} == saved["settings"]
    assert saved["settings"]["reward"] == "custom" and saved["settings"]["chat_template_used"] is False
    assert result.metrics["avg_at_k"] == saved["metrics"]["avg_at_k"]

    markdown = (out / "result.md").read_text()
    assert f"| avg@{k} | {avg:.4f}" in markdown
    assert f"| toy/1 | 7 | {correct['toy/1']} / {k} |" in markdown
    assert "| temperature | 1.0 |" in markdown

    # Same settings, same samples.
    again = run_eval(
        model_dir, toy_data, k=k, max_new_tokens=6, batch_size=2, seed=3, reward_fn=contains_answer, write=False,
        progress=False,
    )  # fmt: skip
    assert [p.num_correct for p in again.problems] == [p["num_correct"] for p in saved["problems"]]


class ScriptedTokenizer:
    """Token i decodes to SCRIPT[i]: lets a fake engine 'say' LaTeX the tiny vocabulary cannot spell."""

    chat_template = None

    def __init__(self, script: Sequence[str]) -> None:
        self.script = list(script)

    def encode(self, text: str) -> list[int]:
        return [len(text)]

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return "".join(self.script[i] for i in ids.tolist())


class ScriptedEngine:
    """Sample j of every prompt is token j (cycling), finished unless it is the last script entry."""

    def __init__(self, script_len: int) -> None:
        self.script_len = script_len
        self.calls: list[SamplingParams] = []

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[RolloutSample]]:
        self.calls.append(params)
        return [
            [
                RolloutSample(
                    prompt_ids=torch.tensor(list(p)),
                    response_ids=torch.tensor([j % self.script_len]),
                    logprobs=torch.zeros(1),
                    finished=j % self.script_len != self.script_len - 1,
                )
                for j in range(params.n)
            ]
            for p in prompts
        ]

    def sync_weights(self, state_dict: object) -> None:
        raise NotImplementedError


def test_math_reward_through_a_pluggable_engine(tmp_path: Path, model_dir: Path) -> None:
    pytest.importorskip("math_verify")
    script = ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/3}", "no box 0.5", "\\boxed{\\frac{1}{2"]
    data = write_records(
        [MathRecord("half?", "0.5", "t", "t/half", "half?"), MathRecord("third?", "\\frac{1}{3}", "t", "t/third", "x")],
        tmp_path / "latex.jsonl",
    )
    engine = ScriptedEngine(len(script))

    def factory(path: Path, settings: EvalSettings) -> tuple[ScriptedEngine, ScriptedTokenizer]:
        assert path == model_dir and settings.k == 5
        return engine, ScriptedTokenizer(script)

    result = run_eval(model_dir, data, k=5, max_new_tokens=9, engine_factory=factory, write=False, progress=False)
    # "half": \frac{1}{2} and 0.5 are right; 1/3, an unboxed 0.5 and an unclosed box are wrong. "third": 1/3 only.
    assert [p.num_correct for p in result.problems] == [2, 1]
    assert result.metrics["avg_at_k"] == pytest.approx((2 / 5 + 1 / 5) / 2)
    assert result.metrics["pass_at_k"] == 1.0
    assert result.metrics["truncated_frac"] == pytest.approx(1 / 5)
    assert result.settings["reward"] == "math_verify_boxed" and result.settings["engine"] == "factory"
    assert [(c.n, c.temperature, c.top_p, c.max_new_tokens) for c in engine.calls] == [(5, 1.0, 1.0, 9)]


def test_checkpoint_resolution(tmp_path: Path, model_dir: Path, toy_data: Path) -> None:
    run = tmp_path / "run"
    for step in ("step_000002", "step_000004"):
        shutil.copytree(model_dir, run / "checkpoints" / step / "model")
        write_manifest(run / "checkpoints" / step)
        (run / "checkpoints" / step / "COMPLETE").write_text("")
    (run / "checkpoints" / "latest").write_text("step_000002")
    (run / "checkpoints" / ".tmp-inflight").mkdir()  # a checkpoint being written by a live trainer

    assert resolve_checkpoint(model_dir).model_dir == model_dir
    latest = resolve_checkpoint(run)
    assert (latest.model_dir, latest.step) == (run / "checkpoints/step_000002/model", "step_000002")
    assert latest.run_dir == run
    step = resolve_checkpoint(run / "checkpoints" / "step_000004")
    assert (step.model_dir, step.step) == (run / "checkpoints/step_000004/model", "step_000004")
    assert (run / "checkpoints" / ".tmp-inflight").is_dir()  # resolution never touches the run

    (run / "checkpoints" / "latest").write_text("step_000009")  # dangling pointer: newest complete step
    assert resolve_checkpoint(run).step == "step_000004"

    result = run_eval(run, toy_data, k=2, max_new_tokens=3, reward_fn=contains_answer, progress=False)
    assert result.out_dir == run / "eval" / "step_000004-toy-k2"
    assert (result.out_dir / "result.json").is_file() and (result.out_dir / "result.md").is_file()

    (run / "checkpoints" / "step_000004" / "COMPLETE").unlink()
    with pytest.raises(UserError, match="not intact"):
        resolve_checkpoint(run / "checkpoints" / "step_000004")
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="not an HF model directory"):
        resolve_checkpoint(tmp_path)


def test_default_reward_with_the_hf_engine_and_user_errors(tmp_path: Path, model_dir: Path, toy_data: Path) -> None:
    pytest.importorskip("math_verify")
    result = run_eval(model_dir, toy_data, k=2, max_new_tokens=4, limit=2, out_dir=tmp_path / "o", progress=False)
    # The tiny vocabulary has no backslash: no response can contain a box, so nothing is right.
    assert result.metrics["num_problems"] == 2 and result.metrics["avg_at_k"] == 0.0
    assert result.settings["reward"] == "math_verify_boxed" and result.settings["engine"] == "hf"
    assert "hf" in ENGINE_FACTORIES
    with pytest.raises(UserError, match="engine='sglang' is not one of"):
        run_eval(model_dir, toy_data, engine="sglang", write=False, progress=False)
    with pytest.raises(UserError, match="top_p"):
        run_eval(model_dir, toy_data, top_p=0.0, write=False, progress=False)
    with pytest.raises(UserError, match="no such file"):
        run_eval(model_dir, tmp_path / "missing.parquet", write=False, progress=False)
    with pytest.raises(UserError, match="no chat template"):
        run_eval(model_dir, toy_data, chat_template="on", write=False, progress=False)


def test_compute_metrics_empty_is_an_error() -> None:
    with pytest.raises(ValueError):
        compute_metrics([], 4)


def test_encode_prompt_with_and_without_chat_template() -> None:
    tokenizer = build_tokenizer()
    assert encode_prompt(tokenizer, "1+2=", False) == tokenizer.encode("1+2=")  # plain: as the trainer encodes
    tokenizer.chat_template = "{% for m in messages %}q: {{ m['content'] }}\n{% endfor %}a: "
    expected = tokenizer("q: 1+2=\na: ", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, "1+2=", True) == expected
