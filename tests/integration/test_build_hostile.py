"""The dataset builder's downloader against hostile URL lists and servers: redirects to cloud metadata
addresses, `download.allow_networks`, the check on the address a socket actually reached, and servers
that drip their headers or body one byte at a time. Real loopback servers, the real `Fetcher`, and one
build through a real local Ray."""
from __future__ import annotations

import ipaddress
import socket
import sys
import time
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.cluster.specs import validate_spec
from clipforge.errors import SpecError, UserError
from clipforge.pipeline.build import run_build
from clipforge.pipeline.fetch import ATTEMPT_DEADLINE_FACTOR, Fetcher, FetchFailed
from clipforge.pipeline.netguard import METADATA_ADDRESSES, AddressPolicy, AddressRefused
from clipforge.pipeline.spec import BuildSpec, DownloadSpec

from http_fixtures import ImageServer

METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
# A drip far slower than any image and far faster than timeout_s: only a whole-attempt deadline can stop it.
DRIP_EVERY_S = 0.2
# The drips give up after this long; the downloader before the per-read deadline waited for all of it.
DRIP_FOR_S = 20
TIMEOUT_S = 1.0
DEADLINE_S = ATTEMPT_DEADLINE_FACTOR * TIMEOUT_S


@pytest.fixture(scope="module")
def server():
    with ImageServer() as s:
        yield s


def redirect_to(server: ImageServer, target: str) -> str:
    return server.url(f"/redirect?to={quote(target, safe='')}")


def fetch_outcome(cfg: DownloadSpec, url: str,
                  policy: AddressPolicy | None = None) -> tuple[bytes | FetchFailed, float]:
    """The body (or the FetchFailed) of one fetch through the builder's downloader, and the seconds it took."""
    t0 = time.monotonic()
    with Fetcher(cfg, policy=policy) as fetcher:
        try:
            result: bytes | FetchFailed = fetcher.fetch(url)
        except FetchFailed as e:
            result = e
    return result, time.monotonic() - t0


# -- seeing every TCP connection attempt this process makes ------------------------------------------

_connects: list | None = None


def _record_connect(event: str, args: tuple) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


class ConnectAttempts:
    """The address of every `socket.connect` made in this process while in use (Python's audit events see
    them all, whatever code path makes them). An audit hook cannot be removed, so one records for good
    and only keeps what happens inside a `with`."""

    _installed = False

    def __enter__(self) -> list:
        global _connects
        if not ConnectAttempts._installed:
            sys.addaudithook(_record_connect)
            ConnectAttempts._installed = True
        _connects = []
        return _connects

    def __exit__(self, *exc) -> None:
        global _connects
        _connects = None


def connected_hosts(addresses: list) -> set[str]:
    return {a[0] for a in addresses if isinstance(a, tuple)}


# -- redirects to cloud metadata ---------------------------------------------------------------------


@pytest.mark.parametrize("allowance", [{"allow_networks": ["127.0.0.0/8"]}, {"allow_private_networks": True}],
                         ids=["allow_networks", "allow_private_networks"])
def test_redirect_to_metadata_is_refused_before_any_connection(server, allowance):
    cfg = DownloadSpec(timeout_s=2, retries=0, **allowance)
    before = server.hits["/redirect"]
    with ConnectAttempts() as attempts:
        result, _ = fetch_outcome(cfg, redirect_to(server, METADATA_URL))
    hosts = connected_hosts(attempts)
    assert "169.254.169.254" not in hosts  # no connection was even tried to the metadata address ...
    assert "127.0.0.1" in hosts and server.hits["/redirect"] == before + 1  # ... only to the loopback hop
    assert isinstance(result, FetchFailed) and result.code == "private_address", result
    message = str(result)
    assert "redirected to http://169.254.169.254/" in message
    assert "cloud metadata address 169.254.169.254" in message and "download.allow_networks" in message


def test_ipv6_metadata_inside_a_private_range_is_refused(server):
    """fd00:ec2::254 lies in fc00::/7, which allow_private_networks opens; the metadata rule wins."""
    cfg = DownloadSpec(timeout_s=2, retries=0, allow_private_networks=True)
    with ConnectAttempts() as attempts:
        result, _ = fetch_outcome(cfg, redirect_to(server, "http://[fd00:ec2::254]/latest/api/token"))
    assert "fd00:ec2::254" not in connected_hosts(attempts)
    assert isinstance(result, FetchFailed) and result.code == "private_address", result
    assert "cloud metadata address fd00:ec2::254" in str(result)


# -- allow_networks --------------------------------------------------------------------------------


def test_allow_networks_opens_what_it_names_and_nothing_else(server):
    url = server.url("/img/24x24.png?seed=40")
    body, _ = fetch_outcome(DownloadSpec(timeout_s=2, allow_networks=["127.0.0.0/8"]), url)
    assert isinstance(body, bytes) and body.startswith(b"\x89PNG")
    hits = server.hits["/img/24x24.png"]

    for refusing in (DownloadSpec(timeout_s=2), DownloadSpec(timeout_s=2, allow_networks=["10.0.0.0/8", "::1"])):
        with ConnectAttempts() as attempts:
            result, _ = fetch_outcome(refusing, url)
        assert isinstance(result, FetchFailed) and result.code == "private_address", result
        assert "non-public address 127.0.0.1" in str(result)
        assert "download.allow_networks, e.g. 127.0.0.1/32" in str(result)
        assert "download.allow_private_networks" in str(result)
        assert ("127.0.0.1", server.port) not in attempts
    assert server.hits["/img/24x24.png"] == hits


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize("address, allow_private, networks, allowed", [
    ("169.254.169.254", False, ["169.254.0.0/16"], True),  # named explicitly: allowed
    ("169.254.169.254", False, ["169.254.169.254"], True),
    ("169.254.169.254", True, [], False),  # allow_private_networks never opens link-local
    ("169.254.169.254", True, ["127.0.0.0/8"], False),
    ("169.254.169.254", False, ["0.0.0.0/0"], False),  # a catch-all is not naming it
    ("169.254.169.254", False, ["128.0.0.0/1"], False),
    ("169.254.1.2", True, [], False),  # any link-local address, not only metadata
    ("169.254.1.2", False, ["169.254.1.0/24"], True),
    ("fe80::1", True, [], False),
    ("fe80::1", False, ["fe80::/10"], True),
    ("fd00:ec2::254", True, [], False),  # metadata inside a private range
    ("fd00:ec2::254", False, ["fd00::/8"], False),
    ("fd00:ec2::254", False, ["fd00:ec2::/32"], True),
    ("fd00:ec2::1", True, [], True),  # an ordinary ULA address
    ("100.100.100.200", False, ["100.64.0.0/10"], False),  # Alibaba's metadata inside a wide CGNAT entry
    ("100.100.100.200", False, ["100.100.100.200/32"], True),
    ("100.64.0.1", False, ["100.64.0.0/10"], True),
    ("100.64.0.1", True, [], False),  # CGNAT is not one of the private ranges
    ("168.63.129.16", False, [], False),  # a public metadata address
    ("::ffff:169.254.169.254", True, [], False),  # IPv4-mapped
    ("64:ff9b::a9fe:a9fe", True, [], False),  # NAT64 of 169.254.169.254
    ("127.0.0.1", True, [], True),
    ("127.0.0.1", False, [], False),
    ("127.0.0.1", False, ["127.0.0.0/8"], True),
    ("10.1.2.3", False, ["127.0.0.0/8"], False),
    ("0.0.0.0", True, ["0.0.0.0/0"], False),  # never, whatever is allowed
    ("224.0.0.1", False, ["224.0.0.0/4"], False),
    ("8.8.8.8", False, [], True),
])
def test_policy(address, allow_private, networks, allowed):
    policy = AddressPolicy.from_settings(allow_private, networks)
    refusal = policy.refusal(ip(address))
    assert (refusal is None) == allowed, refusal


def test_metadata_constant_holds_the_known_endpoints():
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2", "fd20:ce::254"):
        assert ip(address) in METADATA_ADDRESSES


def test_bad_networks_are_refused_at_validation_naming_the_entry(tmp_path):
    raw = {"kind": "build", "input": {"path": "urls.parquet"}, "output": {"path": str(tmp_path / "out")},
           "download": {"allow_networks": ["10.1.2.3/8", "192.168.0.0/16", "not-a-network", "10.0.0.0/33"]}}
    with pytest.raises(SpecError) as caught:
        validate_spec(raw)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3, lines
    assert "field `download.allow_networks.0`" in lines[0] and "did you mean 10.0.0.0/8?" in lines[0]
    assert "field `download.allow_networks.2`" in lines[1] and "'not-a-network' is not a network" in lines[1]
    assert "field `download.allow_networks.3`" in lines[2]
    assert isinstance(caught.value, UserError)
    good = BuildSpec.model_validate({**raw, "download": {"allow_networks": [" 10.0.0.0/8", "192.168.1.5", "::1"]}})
    assert good.download.allow_networks == ["10.0.0.0/8", "192.168.1.5/32", "::1/128"]


# -- the address the socket actually reached --------------------------------------------------------


class BlindResolveCheck(AddressPolicy):
    """A policy whose check at name resolution is fooled (as by DNS rebinding or a proxy in the way): it
    lets every name through. The check of the connected socket is the real, inherited one."""

    def resolve(self, host: str, port: int) -> str:
        return socket.gethostbyname(host)


def test_connected_address_is_checked_before_the_request_is_sent(server):
    cfg = DownloadSpec(timeout_s=2, retries=0)  # no allowance: loopback is refused
    url = server.url("/img/26x26.png", host="localhost")
    with ConnectAttempts() as attempts:
        result, _ = fetch_outcome(cfg, url, policy=BlindResolveCheck())
    assert isinstance(result, FetchFailed) and result.code == "private_address", result
    assert "the connection for host 'localhost' reached non-public address 127.0.0.1" in str(result)
    assert ("127.0.0.1", server.port) in attempts  # the socket did connect ...
    assert server.hits["/img/26x26.png"] == 0  # ... and was closed before a request went out

    allowed = BlindResolveCheck(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    body, _ = fetch_outcome(cfg, url, policy=allowed)
    assert isinstance(body, bytes) and server.hits["/img/26x26.png"] == 1


def test_connected_address_check_reads_any_socket_address_form():
    policy = AddressPolicy.from_settings(True, [])
    policy.check_connected("h", "127.0.0.1")
    policy.check_connected("h", "::ffff:10.0.0.1")
    for peer in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1%lo", "fd00:ec2::254"):
        with pytest.raises(AddressRefused, match="reached"):
            policy.check_connected("h", peer)


# -- servers that drip -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"/drip?every={DRIP_EVERY_S}&bytes=10000&for={DRIP_FOR_S}",
                                  f"/drip-headers?every={DRIP_EVERY_S}&for={DRIP_FOR_S}"],
                         ids=["body", "headers"])
def test_a_drip_is_cut_at_the_attempt_deadline(server, path):
    cfg = DownloadSpec(timeout_s=TIMEOUT_S, retries=0, allow_networks=["127.0.0.0/8"])
    result, elapsed = fetch_outcome(cfg, server.url(path))
    assert isinstance(result, FetchFailed) and result.code == "timeout", result
    assert f"attempt deadline of {DEADLINE_S:g} s" in str(result)
    # Every read ends at the deadline; the old per-chunk check waited for the whole 20 s drip.
    assert DEADLINE_S - 0.2 <= elapsed < DEADLINE_S + 1.5, elapsed


def test_a_slow_response_that_ends_in_time_is_kept(server):
    cfg = DownloadSpec(timeout_s=TIMEOUT_S, retries=0, allow_networks=["127.0.0.0/8"])
    body, elapsed = fetch_outcome(cfg, server.url("/drip?every=0.02&bytes=40"))
    assert body == b"\xff" * 40 and elapsed < DEADLINE_S


# -- one build through Ray ------------------------------------------------------------------------------


def test_build_records_refusals_and_cut_drips_per_row(server, ray_local, tmp_path):
    rows = [
        (server.url("/img/64x48.jpg?seed=41"), "ok"),
        (redirect_to(server, METADATA_URL), "private_address"),
        (METADATA_URL, "private_address"),
        (redirect_to(server, "http://[fd00:ec2::254]/latest/meta-data/"), "private_address"),
        (server.url(f"/drip?every={DRIP_EVERY_S}&bytes=10000&for={DRIP_FOR_S}"), "timeout"),
        (server.url(f"/drip-headers?every={DRIP_EVERY_S}&for={DRIP_FOR_S}"), "timeout"),
    ]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [f"row {i}" for i in range(len(rows))]}), inp)
    spec = BuildSpec.model_validate({
        "kind": "build",
        "input": {"path": str(inp)},
        "output": {"path": str(tmp_path / "out"), "samples_per_shard": 3},
        "download": {"allow_private_networks": True, "timeout_s": TIMEOUT_S, "retries": 0, "threads_per_worker": 3},
        "resize": {"size": 32},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    })
    stats = run_build(spec, progress=False)
    manifest = {r["row"]: r for r in pa.concat_tables(
        [pq.read_table(p) for p in sorted((tmp_path / "out" / "manifest").glob("*.parquet"))]).to_pylist()}
    assert {i: manifest[i]["status"] for i in manifest} == {i: r[1] for i, r in enumerate(rows)}
    assert stats["status_counts"] == {"ok": 1, "private_address": 3, "timeout": 2}
    for i in (1, 2):
        assert "cloud metadata address 169.254.169.254" in manifest[i]["error"]
        assert "download.allow_networks" in manifest[i]["error"]
    assert "cloud metadata address fd00:ec2::254" in manifest[3]["error"]
    for i in (4, 5):
        assert "attempt deadline" in manifest[i]["error"]
