"""HTTP downloads of one worker: pinned connection pools, retries, redirects, size limit, opt-outs.

Connections go to the address that `netguard` checked, never to a fresh DNS answer: each urllib3
pool is keyed by (scheme, checked IP, port, host) and sends the original Host header and TLS SNI,
with the certificate verified against the original host name. Redirects are followed by hand so
that every hop goes through the same check.

Time limits: every socket operation is bounded by `timeout_s`; a body that trickles in below that
rate is cut off once the whole attempt has taken `BODY_DEADLINE_FACTOR * timeout_s`.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable
from urllib.parse import urljoin

import urllib3
from urllib3 import exceptions as u3exc

from clipforge.pipeline import status as st
from clipforge.pipeline.netguard import AddressPolicy, AddressRefused, ResolveFailed
from clipforge.pipeline.robots import opted_out, user_agent_token
from clipforge.pipeline.spec import DownloadSpec
from clipforge.pipeline.urls import InvalidURL, parse_target

MAX_REDIRECTS = 5
BODY_DEADLINE_FACTOR = 4.0
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


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None  # HTTP-date form is rare for images; exponential backoff covers it


class Fetcher:
    """Thread-safe downloader shared by the threads of one shard task."""

    def __init__(self, cfg: DownloadSpec, max_pools: int = 256, limiter: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.limiter = limiter  # called with the host before every request (redirect hops and retries too)
        self.policy = AddressPolicy(allow_private=cfg.allow_private_networks)
        self.ua_token = user_agent_token(cfg.user_agent)
        self._timeout = urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s)
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
        deadline = time.monotonic() + BODY_DEADLINE_FACTOR * self.cfg.timeout_s
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            response = self._open(current)
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
                raise _network_failure(e) from None
            finally:
                # Closing (not draining) drops whatever is unread; the pool reconnects that slot if needed.
                response.close()
                response.release_conn()
        raise FetchFailed(st.TOO_MANY_REDIRECTS, f"more than {MAX_REDIRECTS} redirects")

    def _open(self, url: str) -> urllib3.BaseHTTPResponse:
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
                timeout=self._timeout,
            )
        except (u3exc.HTTPError, OSError) as e:
            raise _network_failure(e) from None

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
            if time.monotonic() > deadline:
                raise FetchFailed(st.TIMEOUT, "body still arriving at the attempt deadline", retryable=True)
        return bytes(body)

    def _pool(self, scheme: str, ip: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, ip, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            common = dict(maxsize=self.cfg.threads_per_worker, block=False, retries=False, timeout=self._timeout)
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    ip, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED",
                    ca_certs=_CA_CERTS, **common,
                )
            else:
                pool = urllib3.HTTPConnectionPool(ip, port, **common)
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


def _reason(e: BaseException) -> str:
    return str(e)[:300]
