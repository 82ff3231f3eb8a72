"""Errors of an evaluation job caused by its input (a folder, a table, a shard, an IDX file, a template)."""
from __future__ import annotations

from clipforge.errors import UserError


class EvalDataError(UserError, ValueError):
    """A task's data cannot be used; the message names the task, the file and the row or field at fault."""
