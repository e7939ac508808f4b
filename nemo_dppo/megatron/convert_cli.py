"""Command lines of `tools/convert_hf_to_megatron.py` and `tools/convert_megatron_to_hf.py`.

    python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR [--tp 2] [--ep 2] [--etp 1] [--pp 1] [--dp N]
    python tools/convert_megatron_to_hf.py MEGATRON_DIR OUT_DIR [--tp 1] [--ep 1] ...

The layout flags choose the parallel layout the model is built with (the Megatron checkpoint itself is
layout-independent: a checkpoint written at EP=2 converts back at any layout). A layout of several ranks starts
them on this machine (gloo on CPU, NCCL on GPUs). Paths and the architecture are checked before any rank starts;
user errors print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from nemo_dppo.config import ConfigError, MegatronConfig
from nemo_dppo.errors import UserError


def _parser(direction: str) -> argparse.ArgumentParser:
    source, target = ("HF_DIR", "OUT_DIR") if direction == "hf_to_megatron" else ("MEGATRON_DIR", "OUT_DIR")
    what = "an HF Qwen3-MoE directory into a Megatron checkpoint" if direction == "hf_to_megatron" else (
        "a Megatron checkpoint (written by convert_hf_to_megatron.py) into an HF directory")  # fmt: skip
    parser = argparse.ArgumentParser(description=f"Convert {what} with megatron-bridge.")
    parser.add_argument("source", metavar=source)
    parser.add_argument("target", metavar=target)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the model while converting")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=1, help="expert-tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel size (default: the fewest that fit)")
    return parser


def _precheck(direction: str, source: Path, layout: MegatronConfig) -> None:
    """Fail with one line before starting ranks: wrong paths, unsupported architecture, indivisible layout."""
    from nemo_dppo.megatron.convert import HF_DIR, WEIGHTS_DIR
    from nemo_dppo.megatron.model import check_layout, read_hf_config

    if direction == "hf_to_megatron":
        check_layout(read_hf_config(source), layout)
    else:
        if not (source / WEIGHTS_DIR).is_dir() or not (source / HF_DIR / "config.json").is_file():
            raise UserError(f"{source} is not a Megatron checkpoint written by convert_hf_to_megatron.py "
                            f"(expected {WEIGHTS_DIR}/ and {HF_DIR}/config.json)")  # fmt: skip
        check_layout(read_hf_config(source / HF_DIR), layout)


def main(direction: str, script: str, argv: Sequence[str] | None = None) -> int:
    """Run one conversion tool (`direction`: hf_to_megatron | megatron_to_hf); `script` is the tool's path."""
    from nemo_dppo.distributed.spawn import is_launched_rank, spawn

    args = _parser(direction).parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        layout = MegatronConfig(tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp, dp=args.dp)
        source = Path(args.source).expanduser()
        if not is_launched_rank():
            _precheck(direction, source, layout)
            if layout.world_size > 1:
                return spawn([script, *(argv if argv is not None else sys.argv[1:])], layout.world_size)
        return _run(direction, source, Path(args.target).expanduser(), layout)
    except (UserError, ConfigError, FileNotFoundError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2


def _run(direction: str, source: Path, target: Path, layout: MegatronConfig) -> int:
    warnings.filterwarnings("ignore")
    from nemo_dppo.megatron import parallel
    from nemo_dppo.megatron.convert import hf_to_megatron, megatron_to_hf

    parallel.initialize(layout, seed=0)
    try:
        (hf_to_megatron if direction == "hf_to_megatron" else megatron_to_hf)(source, target, layout)
    finally:
        parallel.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {target}", file=sys.stderr)
    return 0
