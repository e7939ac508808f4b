"""tools/prepare_data.py and nemo_dppo.data: the real source schemas (DAPO-Math-17k, the AIME 2024 / 2025 files),
dedup, template, exclusion, output formats, one-line errors, MathTask."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from nemo_dppo.data import (
    PREPARED_COLUMNS,
    TEMPLATES,
    DataError,
    MathRecord,
    MathTask,
    build_records,
    load_problems,
    prepare_files,
    read_records,
    strip_dapo_template,
    write_records,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parent.parent
BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{p}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
AIME_1 = "Let $x,y$ be reals with $xy=6$. Find $x^2+y^2$ when $x+y=5$."
AIME_2 = "Find the remainder when $7^{2024}$ is divided by $100$."


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dapo_rows() -> list[dict]:
    """The verl layout of BytedTsinghua-SIA/DAPO-Math-17k: 3 distinct problems, each repeated (as in the original
    file), one copy with different whitespace, one duplicate with a conflicting answer, one AIME problem."""
    problems = [
        ("What is $1+1$?", "2"),
        ("Compute $\\frac{1}{2}+\\frac{1}{4}$.", "\\frac{3}{4}"),
        (AIME_2, "1"),
        ("What   is $1+1$?\n", "2"),  # same problem, other whitespace
        ("What is $1+1$?", "3"),  # conflicting answer
    ]
    rows = []
    for rep in range(3):
        for i, (problem, answer) in enumerate(problems):
            rows.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": DAPO_TEMPLATE.format(p=problem), "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": f"{rep}-{i}"},
                }
            )
    return rows


@pytest.fixture
def dapo_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(_dapo_rows()), path)
    return path


@pytest.fixture
def dapo_jsonl(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "dapo-math-17k.jsonl", _dapo_rows())


@pytest.fixture
def aime24_h4(tmp_path: Path) -> Path:
    """HuggingFaceH4/aime_2024: id (int64), problem, solution, answer (string), url, year."""
    rows = [
        {"id": 60, "problem": AIME_1, "solution": "...", "answer": "13", "url": "u", "year": "2024"},
        {"id": 61, "problem": AIME_2, "solution": "...", "answer": "001", "url": "u", "year": "2024"},
    ]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def aime24_maxwell(tmp_path: Path) -> Path:
    """Maxwell-Jia/AIME_2024: ID, Problem, Solution, Answer (int64)."""
    rows = [
        {"ID": "2024-I-1", "Problem": AIME_1, "Solution": "...", "Answer": 13},
        {"ID": "2024-II-4", "Problem": AIME_2, "Solution": "...", "Answer": 1},
    ]
    path = tmp_path / "aime_2024_problems.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def aime25_opencompass(tmp_path: Path) -> list[Path]:
    """opencompass/AIME2025: aime2025-I.jsonl / aime2025-II.jsonl with question, answer — no ids."""
    part1 = _write_jsonl(tmp_path / "aime2025-I.jsonl", [{"question": "Find $a$.", "answer": "70"}])
    part2 = _write_jsonl(tmp_path / "aime2025-II.jsonl", [{"question": "Find $b$.", "answer": "468"}])
    return [part1, part2]


@pytest.fixture
def aime25_yentinglin(tmp_path: Path) -> Path:
    """yentinglin/aime_2025: problem, answer (parquet)."""
    path = tmp_path / "aime25.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "Find $a$.", "answer": "70", "id": "I-1"}]), path)
    return path


# ---------------------------------------------------------------------------------------------- sources
def test_strip_dapo_template() -> None:
    assert strip_dapo_template(DAPO_TEMPLATE.format(p="What is $1+1$?")) == "What is $1+1$?"
    assert strip_dapo_template("  A plain problem.  ") == "A plain problem."


@pytest.mark.parametrize("fixture", ["dapo_parquet", "dapo_jsonl"])
def test_dapo_dedup_template_and_conflicts(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    records, stats = build_records([path], source="dapo_math_17k")
    # 15 rows; 3 distinct statements (the whitespace variant and the conflicting copy are duplicates).
    assert (stats.rows, stats.kept, stats.duplicates, stats.skipped_empty) == (15, 3, 12, 0)
    assert stats.conflicts == 3  # the "3" copy of 1+1, once per repetition
    assert stats.conflict_ids == ["dapo_math_17k/0-0"]
    assert [r.raw_problem for r in records] == ["What is $1+1$?", "Compute $\\frac{1}{2}+\\frac{1}{4}$.", AIME_2]
    assert [r.expected_answer for r in records] == ["2", "\\frac{3}{4}", "1"]  # the first copy's answer wins
    assert [r.id for r in records] == ["dapo_math_17k/0-0", "dapo_math_17k/0-1", "dapo_math_17k/0-2"]
    assert all(r.source == "dapo_math_17k" for r in records)
    assert records[0].problem == "What is $1+1$?" + BOXED_SUFFIX
    assert "Answer:" not in records[1].problem  # DAPO's own answer-format instruction is gone
    assert records[0].prompt == records[0].problem and records[0].answer == "2"


def test_parquet_and_jsonl_sources_give_identical_records(dapo_parquet: Path, dapo_jsonl: Path) -> None:
    assert build_records([dapo_parquet], "d")[0] == build_records([dapo_jsonl], "d")[0]


def test_aime_2024_schemas(aime24_h4: Path, aime24_maxwell: Path) -> None:
    h4, _ = build_records([aime24_h4], source="aime_2024")
    maxwell, _ = build_records([aime24_maxwell], source="aime_2024")
    assert [(r.id, r.expected_answer) for r in h4] == [("aime_2024/60", "13"), ("aime_2024/61", "001")]
    assert [(r.id, r.expected_answer) for r in maxwell] == [("aime_2024/2024-I-1", "13"), ("aime_2024/2024-II-4", "1")]
    assert [r.problem for r in h4] == [r.problem for r in maxwell] == [AIME_1 + BOXED_SUFFIX, AIME_2 + BOXED_SUFFIX]


def test_aime_2025_schemas(aime25_opencompass: list[Path], aime25_yentinglin: Path) -> None:
    records, stats = build_records(aime25_opencompass, source="aime_2025")
    assert stats.files == 2 and stats.kept == 2
    assert [r.id for r in records] == ["aime_2025/aime2025-I-1", "aime_2025/aime2025-II-1"]  # file stem + row
    assert [r.expected_answer for r in records] == ["70", "468"]
    yl, _ = build_records([aime25_yentinglin], source="aime_2025")
    assert [(r.id, r.raw_problem, r.expected_answer) for r in yl] == [("aime_2025/I-1", "Find $a$.", "70")]


def test_exclude_removes_eval_problems_from_training(tmp_path: Path, dapo_parquet: Path, aime24_maxwell: Path) -> None:
    aime_out = tmp_path / "aime_2024.jsonl"
    prepare_files([aime24_maxwell], aime_out, source="aime_2024", progress=False)
    records, stats = build_records([dapo_parquet], source="dapo_math_17k", exclude=[aime_out])
    assert stats.excluded == 3 and stats.kept == 2  # AIME_2 appeared in all 3 repetitions
    assert AIME_2 not in [r.raw_problem for r in records]


def test_templates_and_limit(dapo_parquet: Path) -> None:
    plain, _ = build_records([dapo_parquet], "d", template="none")
    assert plain[0].problem == plain[0].raw_problem == "What is $1+1$?"
    custom, _ = build_records([dapo_parquet], "d", template="Q: {problem}\nA (boxed, {curly} kept):", limit=2)
    assert len(custom) == 2
    assert custom[0].problem == "Q: What is $1+1$?\nA (boxed, {curly} kept):"
    assert "\\boxed{}" in TEMPLATES["boxed"]
    with pytest.raises(DataError, match="neither a known name"):
        build_records([dapo_parquet], "d", template="no placeholder")


# ---------------------------------------------------------------------------------------- output formats
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_prepared_file_round_trip_and_nemo_rl_keys(tmp_path: Path, dapo_parquet: Path, suffix: str) -> None:
    out = tmp_path / f"train{suffix}"
    stats = prepare_files([dapo_parquet], out, source="dapo_math_17k", progress=False)
    records = read_records(out)
    assert len(records) == stats.kept == 3
    assert records == build_records([dapo_parquet], source="dapo_math_17k")[0]
    row = json.loads(out.read_text().splitlines()[0]) if suffix == ".jsonl" else pq.read_table(out).to_pylist()[0]
    # NeMo-RL: ResponseDataset(input_key="problem", output_key="expected_answer") / math_data_processor keys;
    # no "messages" column (ResponseDataset would prefer it over the keys).
    assert list(row) == list(PREPARED_COLUMNS) and "messages" not in row
    assert row["problem"].endswith("\\boxed{}.") and row["expected_answer"] == "2"
    # A prepared file is a valid input again (re-templating keeps the raw problem, not the templated one).
    again, _ = build_records([out], source="dapo_math_17k", template="none")
    assert [r.problem for r in again] == [r.raw_problem for r in records]


def test_write_records_is_atomic_on_error(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    out.write_text("old\n")
    unserialisable = MathRecord(object(), "1", "s", "j", "p")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # fails after the first row went to the temporary file
        write_records([MathRecord("p", "1", "s", "i", "p"), unserialisable], out)
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]


def test_progress_bar_is_drawn(tmp_path: Path, dapo_parquet: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=100)
    prepare_files([dapo_parquet], tmp_path / "o.jsonl", source="d", progress=True, console=console)
    assert "preparing" in buffer.getvalue() and "15/15" in buffer.getvalue()


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_success(tmp_path: Path, dapo_parquet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data" / "dapo.parquet"
    assert tool.main([str(dapo_parquet), "--out", str(out), "--source", "dapo_math_17k", "--no-progress"]) == 0
    assert len(read_records(out)) == 3
    assert "kept 3, dropped 12 duplicates" in capsys.readouterr().err


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert tool.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors(tmp_path: Path, dapo_parquet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.jsonl")
    err = _cli_error(capsys, str(tmp_path / "missing.parquet"), "--out", out, "--source", "x")
    assert "missing.parquet: no such file" in err

    csv = tmp_path / "aime.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    assert "unknown format '.csv'" in _cli_error(capsys, str(csv), "--out", out, "--source", "x")
    assert "unknown output format '.txt'" in _cli_error(
        capsys, str(dapo_parquet), "--out", str(tmp_path / "o.txt"), "--source", "x"
    )

    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pylist([{"Question_text": "q", "Solution": "s"}]), odd)
    err = _cli_error(capsys, str(odd), "--out", out, "--source", "x")
    assert "missing columns: found Question_text, Solution; expected" in err
    assert "reward_model.ground_truth" in err and "problem|Problem|question, answer|Answer" in err

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"problem": "q", "answer": "1"}\n{not json\n')
    assert "bad.jsonl:2: invalid JSON" in _cli_error(capsys, str(bad_json), "--out", out, "--source", "x")
    assert "overwrite an input" in _cli_error(capsys, str(dapo_parquet), "--out", str(dapo_parquet), "--source", "x")
    assert "source name" in _cli_error(capsys, str(dapo_parquet), "--out", out, "--source", "a b")


# ------------------------------------------------------------------------------------------------- task
def test_load_problems_prepares_raw_files_in_memory(aime24_maxwell: Path) -> None:
    problems = load_problems(aime24_maxwell)
    assert [p.answer for p in problems] == ["13", "1"]
    assert problems[0].prompt == AIME_1 + BOXED_SUFFIX


def test_math_task_interface(tmp_path: Path, dapo_parquet: Path, aime24_maxwell: Path) -> None:
    pytest.importorskip("math_verify")  # the task builds its reward up front
    train, evals = tmp_path / "train.parquet", tmp_path / "aime.jsonl"
    prepare_files([dapo_parquet], train, source="dapo_math_17k", exclude=[aime24_maxwell], progress=False)
    prepare_files([aime24_maxwell], evals, source="aime_2024", progress=False)
    task = MathTask(train, eval_path=evals, seed=0)
    assert task.split_size("train") == 2 and task.split_size("eval") == 2
    assert [p.answer for p in task.all_problems("eval")] == ["13", "1"]
    assert all(p.prompt.endswith("\\boxed{}.") for p in task.all_problems("train"))
    draws = task.sample(5, "train")
    assert len(draws) == 5 and {d.id for d in draws} <= {p.id for p in task.all_problems("train")}
    with pytest.raises(ValueError, match="split"):
        task.all_problems("test")
    # No eval file: a seeded, disjoint hold-out of the training file.
    held = MathTask(train, eval_fraction=0.5, seed=3)
    train_ids = {p.id for p in held.all_problems("train")}
    eval_ids = {p.id for p in held.all_problems("eval")}
    assert len(train_ids) == len(eval_ids) == 1 and not train_ids & eval_ids
    assert eval_ids == {p.id for p in MathTask(train, eval_fraction=0.5, seed=3).all_problems("eval")}


def test_math_task_reward(tmp_path: Path, aime24_maxwell: Path) -> None:
    pytest.importorskip("math_verify")
    task = MathTask(aime24_maxwell, eval_path=aime24_maxwell)
    answer = task.all_problems("eval")[0].answer  # "13"
    assert task.reward("... so $x^2+y^2 = \\boxed{13}$.", answer) == 1.0
    assert task.reward("\\boxed{12}", answer) == -1.0
    assert task.reward("13", answer, correct=1.0, wrong=0.0) == 0.0  # no box
