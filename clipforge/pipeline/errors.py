"""Errors of a dataset build that stop the job (bad input or output), as opposed to per-row failures."""
from __future__ import annotations

from clipforge.errors import UserError


class BuildInputError(UserError, ValueError):
    """The URL list cannot be read: missing file, unreadable file, missing column. The message names them."""


class BuildOutputError(UserError, RuntimeError):
    """A shard could not be written or processed; the message names the shard and the cause."""


class TooFewSuccessesError(UserError, RuntimeError):
    """A finished build in which fewer rows ended `ok` than `min_success_fraction` asks for (by default: none did).
    Every output is kept; the message names the fraction, the most common failures and how to list them."""
