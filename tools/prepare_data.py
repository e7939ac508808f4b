"""Prepare math prompt files for training (single-node trainer and NeMo-RL) and evaluation. Nothing is downloaded.

Fetch the public datasets once, e.g. `huggingface-cli download --repo-type dataset BytedTsinghua-SIA/DAPO-Math-17k
--local-dir raw/dapo`, then:

    python tools/prepare_data.py --source aime_2024 raw/aime24/data/train-00000-of-00001.parquet \\
        --out data/aime_2024.jsonl
    python tools/prepare_data.py --source aime_2025 raw/aime25/aime2025-I.jsonl raw/aime25/aime2025-II.jsonl \\
        --out data/aime_2025.jsonl
    python tools/prepare_data.py --source dapo_math_17k raw/dapo/data/dapo-math-17k.parquet \\
        --out data/dapo_math_17k.parquet --exclude data/aime_2024.jsonl data/aime_2025.jsonl

Output columns: problem (templated prompt), expected_answer, source, id, raw_problem (.jsonl or .parquet).
Errors (missing file, unknown format, missing columns) print one `error:` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from nemo_dppo.data.prepare import DEFAULT_TEMPLATE, TEMPLATES, prepare_files
from nemo_dppo.data.sources import KNOWN_SOURCES
from nemo_dppo.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    sources = "; ".join(f"{name}: {where}" for name, where in KNOWN_SOURCES.items())
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Convert local DAPO-Math-17k / AIME files into prompt files (problem, expected_answer, source, "
        "id, raw_problem) with a boxed-answer template and deduplicated problems.",
        epilog=f"Known sources — {sources}. Any other name is accepted as a label; the column layout is detected.",
    )
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="local .parquet / .jsonl / .json source files")
    parser.add_argument("--out", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--source", required=True, help=f"source label, e.g. {', '.join(KNOWN_SOURCES)}")
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"template name ({', '.join(TEMPLATES)}) or a text containing {{problem}} (default: {DEFAULT_TEMPLATE})",
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="FILE", help="drop problems that appear in these files"
    )
    parser.add_argument("--limit", type=int, default=None, help="keep at most this many problems")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; 0 on success, 2 on a user error (one `error:` line)."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        stats = prepare_files(
            args.inputs,
            args.out,
            source=args.source,
            template=args.template,
            exclude=args.exclude,
            limit=args.limit,
            progress=not args.no_progress,
            console=console,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(f"{args.out}: {stats.summary()}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
