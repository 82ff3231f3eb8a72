"""Errors of a dataset build that stop the job (bad input or output), as opposed to per-row failures."""
from __future__ import annotations

from clipforge.errors import UserError


class BuildInputError(UserError, ValueError):
    """The URL list cannot be read: missing file, unreadable file, missing column. The message names them."""


class BuildOutputError(UserError, RuntimeError):
    """A shard could not be written or processed; the message names the shard and the cause."""
