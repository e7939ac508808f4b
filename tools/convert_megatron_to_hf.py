"""Convert a Megatron checkpoint written by convert_hf_to_megatron.py back into an HF directory (megatron-bridge).

    python tools/convert_megatron_to_hf.py MEGATRON_DIR OUT_DIR [--tp N] [--ep N] [--etp N] [--pp N] [--dp N]

The Megatron engine's own training checkpoints already contain an HF export (`checkpoints/step_N/model/`).
"""

import sys

from nemo_dppo.megatron.convert_cli import main

if __name__ == "__main__":
    sys.exit(main("megatron_to_hf", __file__))
