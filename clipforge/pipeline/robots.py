"""X-Robots-Tag opt-outs: publishers can refuse use of their images in AI training via response headers."""
from __future__ import annotations

import re
from typing import Iterable

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})

# `X-Robots-Tag: otherbot: noindex` scopes the directives to one crawler. Directives that carry a
# value themselves (`unavailable_after: ...`) are not crawler names.
_SCOPED = re.compile(r"^\s*([A-Za-z0-9_.\-*]+)\s*:\s*(.*)$", re.S)
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def user_agent_token(user_agent: str) -> str:
    """The crawler name a scoped header must use to address us: the first product token, lower-case."""
    first = user_agent.strip().split(" ", 1)[0]
    return first.split("/", 1)[0].lower()


def opted_out(header_values: Iterable[str], ua_token: str) -> str | None:
    """The opt-out directive that applies to us, or None. Each header value may be scoped to a crawler."""
    for value in header_values:
        scope = None
        body = value
        m = _SCOPED.match(value)
        if m and m.group(1).lower() not in _VALUED_DIRECTIVES:
            scope, body = m.group(1).lower(), m.group(2)
        if scope not in (None, "*", ua_token):
            continue
        for directive in body.split(","):
            d = directive.strip().lower()
            if d in OPT_OUT_DIRECTIVES:
                return d
    return None
