"""Errors of exporting and predicting caused by the user's input (a path, a model, an image, an option)."""
from __future__ import annotations

from clipforge.errors import UserError


class ExportError(UserError, ValueError):
    """A model cannot be exported, or an export directory cannot be used; the message names the file or part."""


class ExportVerificationError(ExportError):
    """The exported graphs do not reproduce the PyTorch model within tolerance."""
