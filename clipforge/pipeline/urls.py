"""Checking and normalising the URLs of a URL list before anything connects."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters kept as they are when re-quoting: reserved ones and `%` so existing escapes survive.
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?[]"


class InvalidURL(ValueError):
    """The text is not a fetchable http(s) URL."""


@dataclass(frozen=True)
class Target:
    """Where to connect and what to ask for: host (ASCII, no brackets), port, Host header, request target."""

    scheme: str
    host: str
    port: int
    host_header: str
    request_target: str


def _ascii_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidURL(f"host {host!r} is not a valid domain name") from None


def parse_target(url: str) -> Target:
    """Split an http(s) URL into a connection target; raise InvalidURL with the reason otherwise."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise InvalidURL(f"cannot parse URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"unsupported scheme {parts.scheme!r} (only http and https)" if scheme else "no scheme")
    if not parts.hostname:
        raise InvalidURL("no host in URL")
    host = _ascii_host(parts.hostname)
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return Target(scheme=scheme, host=host, port=port, host_header=host_header, request_target=target)
