"""Errors caused by the user's input (a spec, a file, a row, a path, a cluster) rather than by a bug.

Every failure a user can cause is a `UserError` subclass whose message names the file, field, row or
URL at fault and what to do. The command line turns them into one `error: ...` line and the exit code
of the class (`clipforge/cli/errors.py` is the one place that does this); nothing else prints them.

Exit codes of every `clipforge` command:
  0    success
  1    the job or command failed for a reason its message names (unreadable data, storage, a cluster,
       a diverged run, failed sweep children)
  2    the spec, an override or a command-line option is invalid; nothing was run or written
  70   an internal error: a bug in clipforge (a traceback follows the message)
  130  interrupted (Ctrl-C)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Base class of errors whose message is meant for the person running clipforge."""

    exit_code = EXIT_FAILED


class SpecError(UserError, ValueError):
    """A spec or override that cannot be read or validated. The message names the file, line and field."""

    exit_code = EXIT_INVALID


class StorageError(UserError, OSError):
    """A path named in a spec or option cannot be read or written (missing, no credentials, unreachable
    endpoint, refused); the message names the field and the path."""


class OutputFolderError(UserError):
    """An output folder that a job must not write into (empty path, the current folder, a folder holding
    files the job does not own); nothing was written."""

    exit_code = EXIT_INVALID
