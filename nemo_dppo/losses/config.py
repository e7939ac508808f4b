"""Deprecated import path (used by `nemo_dppo/config.py`): `LossConfig` lives in `nemo_dppo.losses.dppo`."""

from nemo_dppo.losses.dppo import LossConfig as LossConfig
