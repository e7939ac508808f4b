"""Convert an HF Qwen3-MoE directory into a Megatron (megatron-core distributed) checkpoint with megatron-bridge.

    python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR [--tp N] [--ep N] [--etp N] [--pp N] [--dp N]

See `nemo_dppo/megatron/convert.py` for the checkpoint layout and `convert_cli.py` for the flags.
"""

import sys

from nemo_dppo.megatron.convert_cli import main

if __name__ == "__main__":
    sys.exit(main("hf_to_megatron", __file__))
