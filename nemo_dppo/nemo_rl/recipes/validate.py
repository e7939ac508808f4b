"""`python -m nemo_dppo.nemo_rl.validate FILE... [-o KEY=VALUE ...]`: validate NeMo-RL recipes.

Prints `ok FILE: <layout>` per valid recipe and `error: FILE: <one line>` per invalid one; exits 1 if any failed.
`-o/--override` applies Hydra-grammar overrides to every file (e.g. `-o loss_fn.mode=dppo_topk_tv`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nemo_dppo.nemo_rl.recipes.recipe_loading import RecipeLoadError
from nemo_dppo.nemo_rl.recipes.recipe_validator import RecipeError, validate_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_dppo.nemo_rl.validate", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="recipe YAML files (NeMo-RL format)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            summary = validate_file(path, args.override)
        except (RecipeError, RecipeLoadError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok {path}: {summary.line()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
