"""Which network addresses a build may connect to.

A URL list is untrusted input: without this guard, a row could make the builder fetch cloud
metadata endpoints or internal services. Hosts are resolved once, every resolved address is
checked, and the connection is then made to a checked address (see `fetch.py`), so a DNS answer
that changes between check and connect (rebinding) cannot reach an internal address.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 prefix: its addresses embed an IPv4 address that the gateway connects to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """The host resolves to an address that the policy forbids."""


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


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False

    def resolve(self, host: str, port: int) -> str:
        """Resolve `host` and return one address to connect to; refuse if ANY resolved address is not public.

        Refusing on any (not all) bad address matters: a host listing one public and one internal
        address must not be usable to reach the internal one.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError) as e:
            raise ResolveFailed(f"cannot resolve host {host!r}: {e}") from None
        addrs: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if ip not in addrs:
                addrs.append(ip)
        if not addrs:
            raise ResolveFailed(f"host {host!r} has no addresses")
        if not self.allow_private:
            bad = [str(ip) for ip in addrs if not is_public(ip)]
            if bad:
                raise AddressRefused(
                    f"host {host!r} resolves to non-public address {', '.join(bad)} "
                    "(set download.allow_private_networks to fetch from internal hosts)"
                )
        return str(addrs[0])
