"""Storage failures on a path the user named, turned into one message that names the spec field.

Object-store clients raise their own exception types (botocore's NoCredentialsError or
EndpointConnectionError, aiohttp's connector errors, fsspec's OSError subclasses) whose messages name
neither the field nor the path; wrapped in `storage_errors(field, url)` they become a `StorageError`
such as "field `data.shards`: s3://bucket/shards: no credentials for the object store (...)".
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from clipforge.errors import StorageError, UserError

# Exception class names (anywhere in the type's MRO) -> what they mean for the user. By name, because botocore
# and aiohttp are optional dependencies here.
_BY_CLASS_NAME = {
    "NoCredentialsError": "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE) where the job runs, or give them in the path's storage_options",
    "PartialCredentialsError": "incomplete credentials for the object store",
    "EndpointConnectionError": "cannot reach the object store endpoint (check AWS_ENDPOINT_URL or the "
                               "storage_options endpoint_url, and that the store is up)",
    "ConnectTimeoutError": "the object store endpoint does not answer (check AWS_ENDPOINT_URL / endpoint_url)",
    "ClientConnectorError": "cannot reach the storage endpoint",
    "InvalidAccessKeyId": "the object store does not know this access key",
    "SignatureDoesNotMatch": "the object store refused the secret key",
}


def _cause_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def storage_problem(err: BaseException, generic: bool = True) -> str | None:
    """What a storage exception means for the user, or None when it is not a storage problem. `generic`: also
    read plain OS errors (missing file, permission) as such — right for a call on a path the user named."""
    for e in _cause_chain(err):
        for cls in type(e).__mro__:
            if cls.__name__ in _BY_CLASS_NAME:
                return _BY_CLASS_NAME[cls.__name__]
        code = getattr(e, "response", {}) or {}
        code = code.get("Error", {}).get("Code") if isinstance(code, dict) else None
        if code in _BY_CLASS_NAME:
            return _BY_CLASS_NAME[code]
    if not generic:
        return None
    if isinstance(err, FileNotFoundError):
        return "does not exist"
    if isinstance(err, PermissionError):
        return f"permission denied ({err})"
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return f"{type(err).__name__}: {err}"
    return None


@contextlib.contextmanager
def storage_errors(field: str, url: str) -> Iterator[None]:
    """Re-raise a storage failure inside the block as a StorageError naming `field` and `url`; a UserError raised
    inside (already named) and any other exception pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # classified below; anything else is re-raised as it was
        problem = storage_problem(e)
        if problem is None:
            raise
        raise StorageError(f"field `{field}`: {url}: {problem}") from e
