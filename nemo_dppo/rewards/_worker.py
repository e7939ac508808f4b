"""The math reward's worker process (`python -m nemo_dppo.rewards._worker`), used off the main thread.

Protocol, one JSON line each way: the parent writes `[response, reference, require_boxed, max_answer_chars]`, the
worker answers `1` (correct) or `0`. It prints `ready` once math-verify is imported, and exits when its stdin
closes. It has no deadline of its own: the parent kills it when an answer is late.
"""

from __future__ import annotations

import contextlib
import json
import sys


def main() -> None:
    """Serve requests until end of input."""
    from nemo_dppo.rewards.math_reward import check_answer, warm_up

    warm_up()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            response, reference, require_boxed, max_answer_chars = json.loads(line)
            ok = check_answer(str(response), str(reference), bool(require_boxed), int(max_answer_chars))
        except Exception:
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        main()
