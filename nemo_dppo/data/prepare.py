"""Source files → prepared prompt files: template, dedup, ids, progress (`tools/prepare_data.py` is the CLI).

    stats = prepare_files(["dapo-math-17k.parquet"], "data/dapo_math_17k.jsonl", source="dapo_math_17k",
                          exclude=["data/aime_2024.jsonl"])

- Template: `{problem}` is replaced literally (no other braces are interpreted, so `\\boxed{}` needs no escaping).
  The default asks for a boxed final answer, which is what `nemo_dppo.rewards.MathReward` reads.
- Dedup: problems are keyed by their normalised statement (Unicode NFKC, whitespace runs collapsed, trimmed);
  the first occurrence wins. Duplicates whose answers differ are counted as conflicts (and listed by id).
- `exclude`: statements found in these files (any supported layout, e.g. the prepared AIME eval files) are
  dropped, so an eval set never leaks into the training set.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nemo_dppo.data.records import (
    DataError,
    MathRecord,
    count_rows,
    is_prepared,
    read_records,
    table_columns,
    write_records,
)
from nemo_dppo.data.sources import detect_layout, read_source

#: Named templates; any other template string must contain `{problem}`.
TEMPLATES: dict[str, str] = {
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "none": "{problem}",
}
DEFAULT_TEMPLATE = "boxed"
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: How many conflicting ids a summary lists.
_MAX_LISTED = 5


def resolve_template(template: str) -> str:
    """A template name from `TEMPLATES`, or a template text containing `{problem}`."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{problem}" not in template:
        names = ", ".join(TEMPLATES)
        raise DataError(f"template {template!r} is neither a known name ({names}) nor a text containing {{problem}}")
    return template


def apply_template(template: str, problem: str) -> str:
    """`template` with `{problem}` replaced by `problem` (literally)."""
    return template.replace("{problem}", problem)


def normalize_problem(text: str) -> str:
    """The dedup key: Unicode NFKC, every whitespace run → one space, trimmed (case and LaTeX kept: x ≠ X)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def normalize_answer(text: str) -> str:
    """For conflict detection only: NFKC, whitespace removed, surrounding `$` dropped."""
    return "".join(unicodedata.normalize("NFKC", text).split()).strip("$")


@dataclass
class PrepareStats:
    """What one preparation did (also printed as a one-paragraph summary)."""

    files: int = 0
    rows: int = 0
    kept: int = 0
    duplicates: int = 0
    conflicts: int = 0
    conflict_ids: list[str] = field(default_factory=list)
    skipped_empty: int = 0
    excluded: int = 0

    def summary(self) -> str:
        text = (
            f"{self.rows} rows from {self.files} file(s): kept {self.kept}, dropped {self.duplicates} duplicates, "
            f"{self.excluded} excluded, {self.skipped_empty} without problem or answer"
        )
        if self.conflicts:
            listed = ", ".join(self.conflict_ids)
            text += f"; {self.conflicts} duplicates had a different answer than the first (kept) copy of: {listed}"
            if len(self.conflict_ids) == _MAX_LISTED:
                text += ", ..."
        return text


def _check_source(source: str) -> str:
    if not _SOURCE_NAME.fullmatch(source):
        raise DataError(f"source name {source!r} must be letters, digits, '_', '.' or '-'")
    return source


def _check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if not path.is_file():
            raise DataError(f"{path}: not a file")
    return paths


def exclusion_keys(paths: Sequence[str | Path]) -> set[str]:
    """Normalised statements of every problem in `paths` (any supported layout)."""
    keys = set()
    for path in _check_inputs(paths):
        keys.update(normalize_problem(p.problem) for p in read_source(path) if p.problem)
    return keys


def build_records(
    inputs: Sequence[str | Path],
    source: str,
    template: str = DEFAULT_TEMPLATE,
    exclude: Sequence[str | Path] = (),
    limit: int | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> tuple[list[MathRecord], PrepareStats]:
    """Read, dedup, filter and template the problems of `inputs` (in file and row order), without writing."""
    source = _check_source(source)
    template_text = resolve_template(template)
    paths = _check_inputs(inputs)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    for path in paths:  # every layout checked before the (long) read starts
        detect_layout(path)
    excluded_keys = exclusion_keys(exclude) if exclude else set()
    stats = PrepareStats(files=len(paths))
    seen: dict[str, tuple[str, str]] = {}  # key → (normalised answer, id)
    used_ids: set[str] = set()
    records: list[MathRecord] = []
    total = sum(count_rows(p) for p in paths)
    with _progress(progress, console, total) as advance:
        for path in paths:
            if limit is not None and len(records) >= limit:
                break
            for raw in read_source(path, on_row=advance):
                if limit is not None and len(records) >= limit:
                    break
                stats.rows += 1
                if not raw.problem or not raw.answer:
                    stats.skipped_empty += 1
                    continue
                key = normalize_problem(raw.problem)
                if key in excluded_keys:
                    stats.excluded += 1
                    continue
                answer_key = normalize_answer(raw.answer)
                if key in seen:
                    stats.duplicates += 1
                    first_answer, first_id = seen[key]
                    if first_answer != answer_key:
                        stats.conflicts += 1
                        if len(stats.conflict_ids) < _MAX_LISTED and first_id not in stats.conflict_ids:
                            stats.conflict_ids.append(first_id)
                    continue
                record_id = _unique_id(source, raw.raw_id or f"{path.stem}-{raw.row}", used_ids)
                seen[key] = (answer_key, record_id)
                records.append(
                    MathRecord(
                        problem=apply_template(template_text, raw.problem),
                        expected_answer=raw.answer,
                        source=source,
                        id=record_id,
                        raw_problem=raw.problem,
                    )
                )
    stats.kept = len(records)
    return records, stats


def prepare_files(
    inputs: Sequence[str | Path],
    out: str | Path,
    source: str,
    template: str = DEFAULT_TEMPLATE,
    exclude: Sequence[str | Path] = (),
    limit: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> PrepareStats:
    """`build_records` and write them to `out` (.jsonl or .parquet, atomically)."""
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise DataError(f"{out}: unknown output format {out.suffix or '(no suffix)'!r}; expected .jsonl or .parquet")
    if out.resolve() in {Path(p).resolve() for p in inputs}:
        raise DataError(f"{out}: the output would overwrite an input file")
    records, stats = build_records(inputs, source, template, exclude, limit, progress, console)
    if not records:
        raise DataError(f"no problems left to write to {out} ({stats.summary()})")
    write_records(records, out)
    return stats


def load_problems(path: str | Path, source: str | None = None, template: str = DEFAULT_TEMPLATE) -> list[MathRecord]:
    """Problems of any supported file: a prepared file as is; a raw source file prepared in memory."""
    path = _check_inputs([path])[0]
    if is_prepared(table_columns(path)):
        return read_records(path)
    records, _ = build_records([path], source or re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem), template)
    return records


def _unique_id(source: str, raw_id: str, used: set[str]) -> str:
    base = raw_id if raw_id.startswith(f"{source}/") else f"{source}/{raw_id}"
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}#{n}"
    used.add(candidate)
    return candidate


@contextmanager
def _progress(enabled: bool, console: Console | None, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over rows (stderr); yields `advance()`."""
    if not enabled:
        yield lambda: None
        return
    bar = Progress(
        TextColumn("[bold]preparing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
    with bar:
        task = bar.add_task("rows", total=total)
        pending = [0]

        def advance() -> None:  # batch the updates: rich is slow per call on 1.8M rows
            pending[0] += 1
            if pending[0] >= 2048:
                bar.advance(task, pending[0])
                pending[0] = 0

        try:
            yield advance
        finally:
            bar.advance(task, pending[0])
