"""Errors of model building and checkpoint handling caused by the user's input (a name, a config, a file)."""
from __future__ import annotations

from clipforge.errors import UserError


class ModelConfigError(UserError, ValueError):
    """An architecture name or config file is unknown or malformed; the message names the file and field."""


class PretrainedWeightsError(UserError, FileNotFoundError):
    """A pretrained tower file is missing or does not fit the architecture; the message names the file."""


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint cannot be found or read; the message names the path."""
