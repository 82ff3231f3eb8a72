"""Errors caused by the user's input (a spec, a file, a row) rather than by a bug.

The CLI prints their message alone (no traceback) and exits non-zero; each component
raises a subclass whose message names the file, field or row at fault.
"""


class UserError(Exception):
    """Base class of errors whose message is meant for the person running clipforge."""
