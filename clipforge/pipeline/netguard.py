"""Which network addresses a build may connect to.

A URL list is untrusted input: without this guard, a row could make the builder fetch cloud
metadata endpoints or internal services. Every address is checked three times over:

- before connecting, every address the host resolves to is checked, and the connection then goes to
  a checked address (see `fetch.py`), so a DNS answer that changes between check and connect
  (rebinding) cannot reach an internal address;
- every redirect hop is a new URL and goes through the same check;
- after connecting and before a byte is sent, the address the socket actually reached is checked
  again (`AddressPolicy.check_connected`), which catches whatever sends a connection somewhere other
  than where it was asked to go (a transparent proxy, a resolver shim, a NAT rule).

What may be reached:

- public (globally routable unicast) addresses;
- loopback and private ranges (`PRIVATE_NETWORKS`) with `download.allow_private_networks`;
- any range named in `download.allow_networks`;
- link-local addresses and `METADATA_ADDRESSES` only through an `allow_networks` entry that contains
  them and is no wider than the link-local range of its family (/16 for IPv4, /10 for IPv6): neither
  `allow_private_networks` nor a wide entry such as 0.0.0.0/0 or 100.64.0.0/10 opens them, because
  these addresses hand out the credentials of the machine the build runs on;
- never: unspecified, "this network" (0.0.0.0/8), broadcast and multicast addresses.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable, cast

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# NAT64 prefix: its addresses embed an IPv4 address that the gateway connects to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Instance-metadata and platform endpoints of cloud providers: from inside an instance they answer
# anyone with the instance's identity and credentials. Refused like link-local addresses even where
# they are public (Azure's WireServer) or inside a private range (AWS's IPv6 endpoint is in fc00::/7).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, Azure, Google Cloud, OpenStack, Oracle, DigitalOcean, Hetzner, IBM ... (IPv4)
    "fd00:ec2::254",    # AWS instance metadata over IPv6
    "fd20:ce::254",     # Google Cloud metadata over IPv6
    "169.254.170.2",    # AWS ECS task metadata and credentials
    "169.254.170.23",   # AWS EKS Pod Identity agent
    "fd00:ec2::23",     # AWS EKS Pod Identity agent over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "169.254.0.23",     # Tencent Cloud
    "192.0.0.192",      # Oracle Cloud Infrastructure Classic
    "168.63.129.16",    # Azure WireServer / host agent (a public address)
))
LINK_LOCAL_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
)
# An allow_networks entry opens link-local and metadata addresses only if it is at least this narrow.
_SPECIAL_MIN_PREFIX = {4: 16, 6: 10}
# What download.allow_private_networks opens: loopback, RFC 1918 private ranges, IPv6 unique-local.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
))
# Not a host anyone serves images from; 0.0.0.0 even reaches the local machine on Linux.
_NEVER_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "255.255.255.255/32", "::/128",
))


class AddressRefused(Exception):
    """The host resolves (or a connection went) to an address that the policy forbids."""


class ResolveFailed(Exception):
    """The host name does not resolve."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (no loopback, private, link-local, ULA, multicast...)."""
    if ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return False
    inner = embedded_ipv4(ip)
    return inner is None or is_public(inner)


def is_metadata_or_link_local(ip: IPAddress) -> bool:
    return ip in METADATA_ADDRESSES or any(ip in net for net in LINK_LOCAL_NETWORKS)


def parse_network(text: str) -> IPNetwork:
    """`text` as a network (a bare address is a /32 or /128); ValueError saying what to write otherwise."""
    text = str(text).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a network: write an address or a CIDR range, e.g. 10.20.0.0/16 or 192.168.1.5"
        ) from None
    raise ValueError(f"{text!r} has bits set after the /{meant.prefixlen} prefix; did you mean {meant}?")


def _as_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)


@dataclass(frozen=True)
class Refusal:
    """Why one address may not be reached: what kind of address it is and which setting would allow it."""

    address: IPAddress
    kind: str
    advice: str

    def describe(self) -> str:
        return f"{self.kind} {self.address}: {self.advice}"


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, allow_private_networks: bool, allow_networks: Iterable[str]) -> "AddressPolicy":
        """The policy of a build's `download.allow_private_networks` and `download.allow_networks`."""
        return cls(allow_private_networks, tuple(parse_network(n) for n in allow_networks))

    def refusal(self, ip: IPAddress) -> Refusal | None:
        """Why a connection to `ip` is not allowed, or None if it is.

        An IPv4-mapped IPv6 address is the IPv4 host itself; 6to4 and NAT64 addresses go through a
        gateway to the IPv4 address they embed, so both must be allowed.
        """
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return self._refusal_of(ip.ipv4_mapped)
        for address in (ip, embedded_ipv4(ip)):
            found = self._refusal_of(address) if address is not None else None
            if found is not None:
                return found
        return None

    def _named(self, ip: IPAddress) -> list[IPNetwork]:
        return [net for net in self.allow_networks if ip in net]

    def _refusal_of(self, ip: IPAddress) -> Refusal | None:
        if ip.is_multicast or any(ip in net for net in _NEVER_NETWORKS):
            return Refusal(ip, "unspecified, broadcast or multicast address",
                           "never fetched: neither download.allow_networks nor download.allow_private_networks "
                           "can allow it")
        if is_metadata_or_link_local(ip):
            if any(net.prefixlen >= _SPECIAL_MIN_PREFIX[ip.version] for net in self._named(ip)):
                return None
            kind = "cloud metadata address" if ip in METADATA_ADDRESSES else "link-local address"
            return Refusal(ip, kind,
                           "refused even with download.allow_private_networks; to allow it, list it in "
                           f"download.allow_networks, e.g. {ip}/{ip.max_prefixlen} (entries wider than "
                           f"/{_SPECIAL_MIN_PREFIX[ip.version]} do not count)")
        if ip.is_global or self._named(ip):
            return None
        if any(ip in net for net in PRIVATE_NETWORKS):
            if self.allow_private:
                return None
            how = "set download.allow_private_networks (loopback and private ranges) or list it in download." \
                  f"allow_networks, e.g. {ip}/{ip.max_prefixlen}"
        else:
            how = f"list it in download.allow_networks, e.g. {ip}/{ip.max_prefixlen} " \
                  "(download.allow_private_networks covers loopback and private ranges only)"
        return Refusal(ip, "non-public address", f"to fetch from it, {how}")

    def resolve(self, host: str, port: int) -> str:
        """Resolve `host` and return one address to connect to; refuse if ANY resolved address is refused.

        Refusing on any (not all) bad address matters: a host listing one public and one internal
        address must not be usable to reach the internal one.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError) as e:
            raise ResolveFailed(f"cannot resolve host {host!r}: {e}") from None
        addrs: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            # A stream lookup returns IPv4/IPv6 addresses, whose sockaddr starts with the host; typeshed's type
            # also covers families whose first item is a number.
            ip = _as_address(cast(str, sockaddr[0]))
            if ip not in addrs:
                addrs.append(ip)
        if not addrs:
            raise ResolveFailed(f"host {host!r} has no addresses")
        refused = [r for r in map(self.refusal, addrs) if r is not None]
        if refused:
            raise AddressRefused(f"host {host!r} resolves to " + "; ".join(r.describe() for r in refused))
        return str(addrs[0])

    def check_connected(self, host: str, peer: str) -> None:
        """Refuse a connection for `host` whose socket reached `peer` (its getpeername() address)."""
        found = self.refusal(_as_address(peer))
        if found is not None:
            raise AddressRefused(f"the connection for host {host!r} reached {found.describe()}")
