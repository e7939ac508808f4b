"""Column layouts of the public math datasets, and reading (problem, answer, id) out of each.

Nothing is downloaded: the user fetches the files once (e.g. `huggingface-cli download --repo-type dataset NAME`)
and passes the local parquet / jsonl / json paths. The layout is recognised from the columns:

- `verl` — BytedTsinghua-SIA/DAPO-Math-17k (and BytedTsinghua-SIA/AIME-2024): `prompt` is a list of chat messages
  `{role, content}` whose user message wraps the problem in DAPO's "Answer:" template (stripped here, since the
  problem is re-templated for a boxed answer), the answer is `reward_model.ground_truth`, the id
  `extra_info.index`. The original DAPO file repeats each problem many times; dedup keeps one.
- `qa` — HuggingFaceH4/aime_2024 (`id`, `problem`, `answer`), Maxwell-Jia/AIME_2024 (`ID`, `Problem`, `Answer`
  as int64), opencompass/AIME2025 (`question`, `answer`, files aime2025-I.jsonl / aime2025-II.jsonl),
  yentinglin/aime_2025 (`problem`, `answer`, optional `id`).
- `prepared` — a file this package wrote (`problem`, `expected_answer`, `raw_problem`, ...): its `raw_problem` is
  read back, so prepared files can be re-templated, merged or used as `--exclude` lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dppo.data.records import DataError, is_prepared, iter_rows, table_columns

#: Public datasets each source name is documented for (the README and `--help` list them).
KNOWN_SOURCES: dict[str, str] = {
    "dapo_math_17k": "BytedTsinghua-SIA/DAPO-Math-17k (data/dapo-math-17k.parquet)",
    "aime_2024": "HuggingFaceH4/aime_2024 (data/train-*.parquet) or Maxwell-Jia/AIME_2024 (aime_2024_problems.parquet)",
    "aime_2025": "opencompass/AIME2025 (aime2025-I.jsonl, aime2025-II.jsonl) or yentinglin/aime_2025",
}

_DAPO_PREFIX = "Solve the following math problem step by step."
_DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after"


@dataclass(frozen=True)
class RawProblem:
    """One row of a source file: the bare problem statement, its answer and an id (None: the row has none)."""

    problem: str
    answer: str
    raw_id: str | None
    row: int  # 1-based row number in its file, for messages and default ids


@dataclass(frozen=True)
class Layout:
    """How to find problem / answer / id in the rows of one dataset family."""

    name: str
    description: str  # the expected columns, for error messages
    columns: tuple[str, ...]  # top-level columns to read (parquet projection)
    matches: Callable[[Sequence[str]], bool]
    extract: Callable[[dict[str, Any]], tuple[Any, Any, Any]]


def strip_dapo_template(text: str) -> str:
    """The bare problem out of DAPO's prompt ("Solve the following ... Answer: $Answer ...\\n\\nPROBLEM\\n\\n
    Remember to put your answer on its own line after \\"Answer:\\"."); other text is returned stripped."""
    text = text.strip()
    if text.startswith(_DAPO_PREFIX):
        _, separator, body = text.partition("\n\n")
        if separator:
            text = body
    cut = text.rfind(_DAPO_SUFFIX)
    if cut >= 0:
        text = text[:cut]
    return text.strip()


def _user_content(prompt: Any) -> Any:
    """The last user message's content of a chat-message list (or the prompt itself when it is a string)."""
    if isinstance(prompt, str) or prompt is None:
        return prompt
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        if users:
            return users[-1].get("content")
    return None


def _verl_extract(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    content = _user_content(row.get("prompt"))
    reward_model = row.get("reward_model") or {}
    extra = row.get("extra_info") or {}
    answer = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    raw_id = extra.get("index") if isinstance(extra, dict) else None
    return (strip_dapo_template(content) if isinstance(content, str) else None), answer, raw_id


_QA_PROBLEM = ("problem", "Problem", "question", "Question")
_QA_ANSWER = ("answer", "Answer", "expected_answer")
_QA_ID = ("id", "ID", "Id")


def _first_key(columns: Sequence[str] | dict[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in columns), None)


def _qa_extract(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    problem_key, answer_key, id_key = (_first_key(row, keys) for keys in (_QA_PROBLEM, _QA_ANSWER, _QA_ID))
    return (
        row.get(problem_key) if problem_key else None,
        row.get(answer_key) if answer_key else None,
        row.get(id_key) if id_key else None,
    )


def _prepared_extract(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    return row.get("raw_problem"), row.get("expected_answer"), row.get("id")


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "prepared",
        "problem, expected_answer, source, id, raw_problem",
        ("raw_problem", "expected_answer", "id"),
        is_prepared,
        _prepared_extract,
    ),
    Layout(
        "verl",
        "prompt (chat messages), reward_model.ground_truth [, extra_info.index]",
        ("prompt", "reward_model", "extra_info"),
        lambda cols: "prompt" in cols and "reward_model" in cols,
        _verl_extract,
    ),
    Layout(
        "qa",
        "problem|Problem|question, answer|Answer|expected_answer [, id|ID]",
        (*_QA_PROBLEM, *_QA_ANSWER, *_QA_ID),
        lambda cols: _first_key(cols, _QA_PROBLEM) is not None and _first_key(cols, _QA_ANSWER) is not None,
        _qa_extract,
    ),
)


def detect_layout(path: str | Path, columns: Sequence[str] | None = None) -> Layout:
    """The layout of a file from its columns; `DataError` listing found and expected columns otherwise."""
    columns = list(columns) if columns is not None else table_columns(path)
    for layout in LAYOUTS:
        if layout.matches(columns):
            return layout
    expected = "; or ".join(f"{layout.description} ({layout.name})" for layout in LAYOUTS)
    raise DataError(f"{path}: missing columns: found {', '.join(columns) or 'none'}; expected {expected}")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():  # an integer answer stored as float ("34.0")
        value = int(value)
    return str(value).strip()


def read_source(path: str | Path, on_row: Callable[[], None] | None = None) -> Iterator[RawProblem]:
    """The problems of one source file in row order (rows with an empty problem or answer are yielded with
    empty fields; the caller counts and skips them). `on_row` is called once per row read (progress)."""
    columns = table_columns(path)
    layout = detect_layout(path, columns)
    projection = [c for c in layout.columns if c in columns]
    for number, row in enumerate(iter_rows(path, projection), 1):
        problem, answer, raw_id = layout.extract(row)
        if on_row is not None:
            on_row()
        yield RawProblem(_text(problem), _text(answer), None if raw_id is None else _text(raw_id) or None, number)
