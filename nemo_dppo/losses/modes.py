"""Deprecated import path (used by the engines and the trainer): the mode registry lives in `nemo_dppo.losses.dppo`."""

from nemo_dppo.losses.dppo import LOSS_MODES as LOSS_MODES
from nemo_dppo.losses.dppo import TrustRegion as TrustRegion
from nemo_dppo.losses.dppo import get_mode as get_mode
