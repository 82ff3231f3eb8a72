"""HTTP downloads of one worker: pinned connection pools, retries, redirects, size limit, opt-outs.

Connections go to the address that `netguard` checked, never to a fresh DNS answer: each urllib3
pool is keyed by (scheme, checked IP, port, host) and sends the original Host header and TLS SNI,
with the certificate verified against the original host name. Redirects are followed by hand so
that every hop goes through the same check, and every new connection checks the address its socket
actually reached before it sends the request (`_CheckedConnectionMixin`).

Time limits: connecting and each read wait at most `timeout_s`, and a whole attempt (all redirect
hops, headers and body) ends at its deadline, `ATTEMPT_DEADLINE_FACTOR * timeout_s` after it began.
The deadline bounds every single socket read (`_DeadlineReader`), not just the gaps between chunks:
a server that drips one byte a second, in the headers or in the body, is cut off on time.
"""
from __future__ import annotations

import collections
import http.client
import io
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urljoin

import urllib3
from urllib3 import exceptions as u3exc
from urllib3.connection import HTTPConnection, HTTPSConnection

from clipforge.pipeline import status as st
from clipforge.pipeline.netguard import AddressPolicy, AddressRefused, ResolveFailed
from clipforge.pipeline.robots import opted_out, user_agent_token
from clipforge.pipeline.spec import DownloadSpec
from clipforge.pipeline.urls import InvalidURL, parse_target

MAX_REDIRECTS = 5
ATTEMPT_DEADLINE_FACTOR = 4.0
MAX_RETRY_AFTER_S = 30.0
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 1 << 16

try:  # certifi's bundle when present, else the system store
    import certifi

    _CA_CERTS: str | None = certifi.where()
except ImportError:  # pragma: no cover - certifi ships with requests, which is a dependency of ray
    _CA_CERTS = None


class FetchFailed(Exception):
    """A download that did not produce a body; `code` is the manifest status."""

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


class AttemptDeadlineExceeded(TimeoutError):
    """A read that would end after the attempt's deadline (a socket timeout, so urllib3 reports it as one)."""


class _AttemptDeadline(threading.local):
    """When the attempt running on this thread must end (None outside an attempt).

    urllib3 creates the connections and responses inside `urlopen`, out of the caller's reach; they
    read the deadline from here, which is safe because one thread runs one attempt at a time.
    """

    at: float | None = None


_attempt = _AttemptDeadline()


class _DeadlineReader(io.RawIOBase):
    """The raw socket stream of one response, each read bounded by what is left of the attempt.

    A buffered reader loops over raw reads until it has what it was asked for (a whole header line,
    a 64 KiB chunk); a per-read socket timeout alone lets a slow drip keep such a loop going forever.
    Here every single recv gets at most the time left, and none is started after the deadline.
    """

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counts as a user of the socket, like http.client's own
        self._deadline = deadline
        self._read_timeout = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise AttemptDeadlineExceeded("attempt deadline passed")
        capped = self._read_timeout is None or left < self._read_timeout
        self._sock.settimeout(left if capped else self._read_timeout)
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:
            if capped:
                raise AttemptDeadlineExceeded("attempt deadline passed") from None
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response reading through a `_DeadlineReader` while an attempt deadline is set."""

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        if _attempt.at is not None:
            self.fp.close()  # the plain reader http.client made; nothing has been read from it yet
            self.fp = io.BufferedReader(_DeadlineReader(sock, _attempt.at))


if TYPE_CHECKING:
    # The mixin's super() is urllib3's connection class it is mixed into.
    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


class _CheckedConnectionMixin(_ConnectionBase):
    """A pooled connection that checks the address its socket reached before anything is sent.

    The pool connects to an address `netguard` already checked, so a refusal here means something
    redirected the connection on the way (a proxy, a resolver or routing trick).
    """

    response_class = _DeadlineResponse

    def __init__(self, *args, address_policy: AddressPolicy, url_host: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._address_policy = address_policy
        self._url_host = url_host

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        try:
            self._address_policy.check_connected(self._url_host, sock.getpeername()[0])
        except BaseException:
            sock.close()
            raise
        return sock


class _CheckedHTTPConnection(_CheckedConnectionMixin, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedConnectionMixin, HTTPSConnection):
    pass


class _CheckedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None  # HTTP-date form is rare for images; exponential backoff covers it


class Fetcher:
    """Thread-safe downloader shared by the threads of one shard task."""

    def __init__(self, cfg: DownloadSpec, max_pools: int = 256, limiter: Callable[[str], None] | None = None,
                 policy: AddressPolicy | None = None):
        self.cfg = cfg
        self.limiter = limiter  # called with the host before every request (redirect hops and retries too)
        self.policy = policy if policy is not None else AddressPolicy.from_settings(
            cfg.allow_private_networks, cfg.allow_networks
        )
        self.ua_token = user_agent_token(cfg.user_agent)
        self._timeout = urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s)
        self._attempt_s = ATTEMPT_DEADLINE_FACTOR * cfg.timeout_s
        self._headers = {
            "User-Agent": cfg.user_agent,
            "Accept": "image/avif,image/webp,image/*,*/*;q=0.8",
            "Accept-Encoding": "gzip, deflate",
        }
        self._pools: collections.OrderedDict[tuple, urllib3.HTTPConnectionPool] = collections.OrderedDict()
        self._max_pools = max_pools
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, url: str) -> bytes:
        """The body of `url` (after redirects), retrying transient failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return self._fetch_once(url)
            except FetchFailed as e:
                if not e.retryable or attempt >= self.cfg.retries:
                    if attempt:
                        e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                    raise
                delay = self.cfg.retry_backoff_s * (2**attempt)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_RETRY_AFTER_S))
                time.sleep(delay)
                attempt += 1

    def _fetch_once(self, url: str) -> bytes:
        deadline = time.monotonic() + self._attempt_s
        _attempt.at = deadline
        try:
            return self._follow(url, deadline)
        finally:
            _attempt.at = None

    def _follow(self, url: str, deadline: float) -> bytes:
        """The body of `url`, following redirects by hand, all within `deadline`."""
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = self._open(current, deadline)
            except FetchFailed as e:
                if current != url:  # say where the redirects led: the row's own URL may look harmless
                    e.args = (f"redirected to {current[:200]}: {e.args[0]}",)
                raise
            try:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed(st.http_status(response.status), "redirect without a Location header")
                    current = urljoin(current, location.strip())
                    continue
                if not 200 <= response.status < 300:
                    code = response.status
                    raise FetchFailed(
                        st.http_status(code),
                        f"HTTP {code} {response.reason or ''}".strip() + (f" from {current}" if current != url else ""),
                        retryable=code >= 500 or code == 429,
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                directive = opted_out(response.headers.getlist("X-Robots-Tag"), self.ua_token)
                if directive:
                    raise FetchFailed(st.OPTED_OUT, f"X-Robots-Tag: {directive}")
                return self._read_body(response, deadline)
            except (u3exc.HTTPError, OSError) as e:
                raise self._network_failure(e) from None
            finally:
                # Closing (not draining) drops whatever is unread; the pool reconnects that slot if needed.
                response.close()
                response.release_conn()
        raise FetchFailed(st.TOO_MANY_REDIRECTS, f"more than {MAX_REDIRECTS} redirects")

    def _open(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        try:
            target = parse_target(url)
        except InvalidURL as e:
            raise FetchFailed(st.INVALID_URL, f"{e}: {url[:200]}") from None
        try:
            ip = self.policy.resolve(target.host, target.port)
        except AddressRefused as e:
            raise FetchFailed(st.PRIVATE_ADDRESS, str(e)) from None
        except ResolveFailed as e:
            raise FetchFailed(st.CONNECTION_ERROR, str(e), retryable=True) from None
        pool = self._pool(target.scheme, ip, target.port, target.host)
        if self.limiter is not None:
            self.limiter(target.host)
        try:
            return pool.urlopen(
                "GET",
                target.request_target,
                headers={**self._headers, "Host": target.host_header},
                redirect=False,
                retries=False,
                preload_content=False,
                release_conn=False,
                assert_same_host=False,
                timeout=self._hop_timeout(deadline),
            )
        except AddressRefused as e:  # from the connected-address check
            raise FetchFailed(st.PRIVATE_ADDRESS, str(e)) from None
        except (u3exc.HTTPError, OSError) as e:
            raise self._network_failure(e) from None

    def _hop_timeout(self, deadline: float) -> urllib3.Timeout:
        """Connecting (TLS handshake included) waits at most `timeout_s`, and never past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._deadline_failure()
        return urllib3.Timeout(connect=min(self.cfg.timeout_s, left), read=self.cfg.timeout_s)

    def _deadline_failure(self) -> FetchFailed:
        return FetchFailed(
            st.TIMEOUT,
            f"no complete response within the attempt deadline of {self._attempt_s:g} s "
            f"({ATTEMPT_DEADLINE_FACTOR:g} x download.timeout_s)",
            retryable=True,
        )

    def _network_failure(self, e: BaseException) -> FetchFailed:
        if _caused_by_deadline(e):
            return self._deadline_failure()
        return _network_failure(e)

    def _read_body(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        limit = self.cfg.max_bytes
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise FetchFailed(st.TOO_LARGE, f"Content-Length {length} exceeds max_bytes {limit}")
        body = bytearray()
        for chunk in response.stream(_CHUNK, decode_content=True):
            body += chunk
            if len(body) > limit:
                raise FetchFailed(st.TOO_LARGE, f"body exceeds max_bytes {limit}")
            if time.monotonic() > deadline:  # reads stop at the deadline; decoding time counts too
                raise self._deadline_failure()
        return bytes(body)

    def _pool(self, scheme: str, ip: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, ip, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            common: dict[str, Any] = dict(maxsize=self.cfg.threads_per_worker, block=False, retries=False,
                                          timeout=self._timeout, address_policy=self.policy, url_host=host)
            if scheme == "https":
                pool = _CheckedHTTPSPool(
                    ip, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED",
                    ca_certs=_CA_CERTS, **common,
                )
            else:
                pool = _CheckedHTTPPool(ip, port, **common)
            self._pools[key] = pool
            while len(self._pools) > self._max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool


def _network_failure(e: BaseException) -> FetchFailed:
    """Map a urllib3/socket error to a manifest code; connection problems and timeouts are transient."""
    if isinstance(e, FetchFailed):
        return e
    if isinstance(e, u3exc.NewConnectionError):  # before TimeoutError: it subclasses ConnectTimeoutError
        return FetchFailed(st.CONNECTION_ERROR, f"cannot connect: {_reason(e)}", retryable=True)
    if isinstance(e, (u3exc.TimeoutError, TimeoutError)):
        return FetchFailed(st.TIMEOUT, f"timed out: {_reason(e)}", retryable=True)
    if isinstance(e, u3exc.SSLError):
        return FetchFailed(st.CONNECTION_ERROR, f"TLS error: {_reason(e)}")
    if isinstance(e, u3exc.DecodeError):
        return FetchFailed(st.CONNECTION_ERROR, f"bad content encoding: {_reason(e)}")
    return FetchFailed(st.CONNECTION_ERROR, f"{type(e).__name__}: {_reason(e)}", retryable=True)


def _caused_by_deadline(e: BaseException) -> bool:
    """Whether `e` or an error it wraps (urllib3 wraps socket timeouts) is an `AttemptDeadlineExceeded`."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, AttemptDeadlineExceeded):
            return True
        todo += [x for x in (err.__cause__, err.__context__, *err.args) if isinstance(x, BaseException)]
    return False


def _reason(e: BaseException) -> str:
    return str(e)[:300]
