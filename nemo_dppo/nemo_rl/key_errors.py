"""One-line "unknown key" messages with the closest valid key and the list of valid keys."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_key_message(section: str, key: str, valid: Iterable[str]) -> str:
    """`unknown key 'loss_fn.modee' — did you mean 'mode'? valid keys in 'loss_fn': a, b, ...` (one line)."""
    names = sorted(valid)
    path = f"{section}.{key}" if section else key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    where = f"'{section}'" if section else "the top level"
    return f"unknown key '{path}'{hint} valid keys in {where}: {', '.join(names)}"
