"""Math prompt data: prepared prompt files (`records`), source-dataset layouts (`sources`), preparation
(`prepare`: template, dedup, decontamination) and `MathTask`, which serves them to the trainer."""

from nemo_dppo.data.math_task import MathTask
from nemo_dppo.data.prepare import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    PrepareStats,
    apply_template,
    build_records,
    load_problems,
    normalize_problem,
    prepare_files,
    resolve_template,
)
from nemo_dppo.data.records import PREPARED_COLUMNS, DataError, MathRecord, read_records, write_records
from nemo_dppo.data.sources import KNOWN_SOURCES, detect_layout, read_source, strip_dapo_template

__all__ = [
    "DEFAULT_TEMPLATE",
    "KNOWN_SOURCES",
    "PREPARED_COLUMNS",
    "TEMPLATES",
    "DataError",
    "MathRecord",
    "MathTask",
    "PrepareStats",
    "apply_template",
    "build_records",
    "detect_layout",
    "load_problems",
    "normalize_problem",
    "prepare_files",
    "read_records",
    "read_source",
    "resolve_template",
    "strip_dapo_template",
    "write_records",
]
