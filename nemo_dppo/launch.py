"""`python -m nemo_dppo.launch train CONFIG.yaml`: the per-rank entry point of `nemo-dppo train` with a multi-rank
Megatron layout (started by `nemo_dppo.distributed.spawn`, or by torchrun / srun on a cluster).

Rank 0 prints the user errors (one `error:` line, exit 2); the others exit 2 quietly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def _rank_main(argv: Sequence[str]) -> int:
    """Entry point of one rank: `train CONFIG.yaml`."""
    from nemo_dppo.errors import UserError

    if len(argv) != 2 or argv[0] != "train":
        print("usage: python -m nemo_dppo.launch train CONFIG.yaml", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    try:
        from nemo_dppo.config import load_config
        from nemo_dppo.trainer import train

        train(load_config(argv[1]))
    except (UserError, FileNotFoundError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
