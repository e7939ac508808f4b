"""Errors that reach the user as one line (the CLI prints them without a traceback and exits non-zero)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config value, missing path, incompatible model and tokenizer."""


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/inf; the step is not applied and the run stops."""
