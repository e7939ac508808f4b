"""Prompt files: the prepared record format and reading / writing parquet, jsonl and json tables.

A prepared file (written by `tools/prepare_data.py`) has one row per problem with five string columns:

    problem          the full prompt: the problem inside the template, with the boxed-answer instruction
    expected_answer  the reference answer ("34", "\\frac{1}{2}")
    source           where it came from ("dapo_math_17k", "aime_2024", ...)
    id               unique within the file ("aime_2024/2024-I-1")
    raw_problem      the problem statement before templating (dedup key, re-templating)

The single-node trainer reads it through `nemo_dppo.data.MathTask`; NeMo-RL reads the same file with
`ResponseDataset` (`input_key: problem`, `output_key: expected_answer`) or `math_data_processor` (which reads
`problem` / `expected_answer` directly). There is deliberately no `messages` column: `ResponseDataset` would use it
instead of the two keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nemo_dppo.errors import UserError

PREPARED_COLUMNS: tuple[str, ...] = ("problem", "expected_answer", "source", "id", "raw_problem")
#: File suffix → format name.
FORMATS: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}


class DataError(UserError):
    """A problem with an input or output data file; the message is one line naming the file."""


@dataclass(frozen=True)
class MathRecord:
    """One prepared problem. `.prompt` / `.answer` make it usable wherever the trainer takes a task `Problem`."""

    problem: str
    expected_answer: str
    source: str
    id: str
    raw_problem: str

    @property
    def prompt(self) -> str:
        """The text given to the policy (the templated problem)."""
        return self.problem

    @property
    def answer(self) -> str:
        """The reference answer the reward compares against."""
        return self.expected_answer


# ---------------------------------------------------------------------------------------------- formats
def file_format(path: str | Path) -> str:
    """'parquet' | 'jsonl' | 'json' from the suffix; `DataError` for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise DataError(f"{path}: unknown format {suffix or '(no suffix)'!r}; expected one of {known}")
    return FORMATS[suffix]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    return path


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            "parquet files need pyarrow: pip install -c constraints-cpu.txt -e '.[math]' (or use .jsonl)"
        ) from None
    return pyarrow


def table_columns(path: str | Path) -> list[str]:
    """Top-level column names: the parquet schema, or the keys of the first JSON record."""
    path = _existing(path)
    fmt = file_format(path)
    if fmt == "parquet":
        pa = _pyarrow()
        try:
            return list(pa.parquet.read_schema(path).names)
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
    for _, row in _iter_json(path, fmt):
        return list(row)
    return []


def count_rows(path: str | Path) -> int:
    """Number of rows (parquet metadata; non-blank lines of jsonl; array length of json)."""
    path = _existing(path)
    fmt = file_format(path)
    if fmt == "parquet":
        pa = _pyarrow()
        try:
            return int(pa.parquet.ParquetFile(path).metadata.num_rows)
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
    if fmt == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in _iter_json(path, fmt))


def iter_rows(path: str | Path, columns: Sequence[str] | None = None, batch_size: int = 4096) -> Iterator[dict]:
    """Rows as dicts (nested structs / lists as Python dicts / lists). `columns`: read only these (parquet)."""
    path = _existing(path)
    fmt = file_format(path)
    if fmt != "parquet":
        for _, row in _iter_json(path, fmt):
            yield row
        return
    pa = _pyarrow()
    try:
        parquet = pa.parquet.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)
        for batch in batches:
            yield from batch.to_pylist()
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read parquet ({_first_line(err)})") from None


def _iter_json(path: Path, fmt: str) -> Iterator[tuple[int, dict]]:
    """(1-based line / element number, record) for jsonl and json files; one-line errors with the position."""
    if fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: invalid JSON ({_first_line(err)})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        for number, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: element {number} is {type(row).__name__}, expected an object")
            yield number, row
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({_first_line(err)})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


# ------------------------------------------------------------------------------------------ prepared files
def is_prepared(columns: Iterable[str]) -> bool:
    """True when the columns are those of a prepared file."""
    return set(PREPARED_COLUMNS) <= set(columns)


def read_records(path: str | Path) -> list[MathRecord]:
    """All records of a prepared file (parquet / jsonl / json), in file order."""
    path = _existing(path)
    columns = table_columns(path)
    missing = [c for c in PREPARED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{path}: not a prepared prompt file: missing columns {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'}; expected: {', '.join(PREPARED_COLUMNS)}); "
            "run tools/prepare_data.py on it first"
        )
    records = []
    for number, row in enumerate(iter_rows(path, PREPARED_COLUMNS), 1):
        values = {c: row.get(c) for c in PREPARED_COLUMNS}
        absent = [c for c, v in values.items() if v is None]
        if absent:
            raise DataError(f"{path}: row {number} has no value for {', '.join(absent)}")
        records.append(MathRecord(**{c: str(v) for c, v in values.items()}))
    return records


def write_records(records: Sequence[MathRecord], path: str | Path) -> Path:
    """Write a prepared file (format from the suffix), atomically: a temporary file renamed into place."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "json":
        raise DataError(f"{path}: write prepared files as .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        rows = [asdict(r) for r in records]
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            pa = _pyarrow()
            schema = pa.schema([(c, pa.string()) for c in PREPARED_COLUMNS])
            table = pa.Table.from_pylist(rows, schema=schema)
            pa.parquet.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
