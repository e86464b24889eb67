"""SSRF protection for image downloads: which addresses an image URL may reach, checked where it connects.

A task's image URL is chosen by whoever can create tasks, and the backend usually runs next to other
services (Label Studio, Redis, the cloud metadata endpoint at 169.254.169.254). So, outside Label Studio's
own origin, a download may only reach public addresses, unless IMAGE_URL_ALLOWLIST names the host, IP or
network. The check runs on the *resolved* address inside the connection (``GuardedAdapter``): the socket
connects to the very address that was checked, so a DNS answer that changes between a check and the connect
(DNS rebinding) cannot slip through, and decimal/octal/hex spellings of an IP (``http://2130706433/``) are
caught because the resolver turns them into the address that is checked.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Callable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Origin = tuple[str, str, int | None]  # (scheme, host, port), as images._origin returns

_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; not is_private in every Python
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are an IPv4 target


class AddressRefused(Exception):
    """A connection would go to a refused address; ``images`` turns it into an ImageError naming the URL.

    Not an OSError on purpose: urllib3 and requests pass unknown exceptions through unchanged (no retry,
    no wrapping), so the reason reaches the caller intact.
    """

    def __init__(self, host: str, port: int | None, address: str, reason: str):
        super().__init__(f"{host}:{port} resolves to {address}, {reason}")
        self.host, self.port, self.address, self.reason = host, port, address, reason


def _norm_host(host: str) -> str:
    return (host or "").strip().strip("[]").rstrip(".").lower()


# -- the allowlist ----------------------------------------------------------------------------------
class Allowlist:
    """IMAGE_URL_ALLOWLIST, parsed once: host names, IP addresses or networks, each optionally ``:port``.

    IPv6 with a port goes in brackets (``[fd00::1]:8080``, ``[fd00::/8]:443``); a bare IPv6 has no port.
    Raises ValueError naming the bad entry.
    """

    def __init__(self, text: str = ""):
        self.names: list[tuple[str, int | None]] = []
        self.networks: list[tuple[Network, int | None]] = []
        for entry in (text or "").split(","):
            if entry.strip():
                self._add(entry.strip())

    def _add(self, entry: str) -> None:
        hint = ("IMAGE_URL_ALLOWLIST entry {!r} is {}: expected a host name, an IP address or a CIDR network, "
                "each optionally with :port (IPv6 with a port in brackets: [fd00::1]:8080)")
        if "://" in entry:
            raise ValueError(hint.format(entry, "a URL"))
        host, port = entry, None
        if entry.startswith("["):
            close = entry.find("]")
            rest = entry[close + 1:] if close > 0 else "?"
            if close < 0 or (rest and not rest.startswith(":")):
                raise ValueError(hint.format(entry, "malformed"))
            host, port_text = entry[1:close], rest[1:] if rest else None
            port = self._port(entry, port_text, hint)
        elif entry.count(":") == 1:  # host:port or v4:port (two or more colons: a bare IPv6)
            host, port_text = entry.split(":")
            port = self._port(entry, port_text, hint)
        host = host.strip().lower()
        try:
            self.networks.append((ipaddress.ip_network(host, strict=False), port))
            return
        except ValueError:
            pass
        if entry.startswith("[") or ":" in host or "/" in host or not _HOST.match(host.rstrip(".")):
            raise ValueError(hint.format(entry, "not valid"))
        self.names.append((host.rstrip("."), port))

    @staticmethod
    def _port(entry: str, text: str | None, hint: str) -> int | None:
        if text is None:
            return None
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(hint.format(entry, "not valid (bad port)"))
        return int(text)

    def __bool__(self) -> bool:
        return bool(self.names or self.networks)

    def allows(self, host: str, port: int | None, address: IPAddress) -> bool:
        host = _norm_host(host)
        if any(name == host and allowed in (None, port) for name, allowed in self.names):
            return True
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            candidates.append(address.ipv4_mapped)  # ::ffff:10.0.0.1 is 10.0.0.1
        return any(a.version == net.version and a in net and allowed in (None, port)
                   for net, allowed in self.networks for a in candidates)


def parse_allowlist(text: str) -> Allowlist:
    return Allowlist(text)


# -- which addresses are internal -------------------------------------------------------------------
def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one ("a loopback address", ...), or None when it is public.

    ``is_global`` is the base; the explicit checks name the reason and cover what it lets through in some
    Python versions (multicast, IPv4 inside IPv6: mapped, NAT64 and 6to4 addresses carry an IPv4 target).
    """
    kind = _internal_kind(address)
    return None if kind is None else f"{'an' if kind[0] in 'aeiouIU' else 'a'} {kind} address"


def _internal_kind(address: IPAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address):
        embedded, how = None, ""
        if address.ipv4_mapped:
            embedded, how = address.ipv4_mapped, "IPv4-mapped "
        elif address in _NAT64:
            embedded, how = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64 "
        elif address.sixtofour:
            embedded, how = address.sixtofour, "6to4 "
        if embedded is not None:
            inner = _internal_kind(embedded)
            return f"{how}{inner}" if inner else None
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("shared (carrier-grade NAT)", address.version == 4 and address in _SHARED),
              ("private", address.is_private), ("reserved", address.is_reserved),
              ("site-local", getattr(address, "is_site_local", False)), ("non-public", not address.is_global))
    return next((name for name, hit in checks if hit), None)


# -- the connection ---------------------------------------------------------------------------------
class UrlGuard:
    """The policy: Label Studio's origin (``ls_origin()``, e.g. ``("http", "ls", 8080)``) may be anything the
    operator configured; every other origin only public addresses or what the allowlist names."""

    def __init__(self, allowlist: Allowlist, ls_origin: Callable[[], Origin | None]):
        self.allowlist = allowlist
        self.ls_origin = ls_origin

    def check(self, scheme: str, host: str, port: int | None, address: IPAddress) -> str | None:
        """None when a connection to ``address`` for ``scheme://host:port`` may go ahead, else the reason."""
        ls = self.ls_origin()
        if ls is not None and ls == (scheme, _norm_host(host), port):
            return None
        reason = refusal_reason(address)
        if reason is None or self.allowlist.allows(host, port, address):
            return None
        return reason


def _guarded_connect(conn: HTTPConnection, guard: UrlGuard, scheme: str):
    """HTTPConnection._new_conn, resolving here: check every address getaddrinfo gives and connect only to an
    approved one. TLS is wrapped around this socket by urllib3 afterwards, still for ``conn.host`` (SNI and
    certificate checks are on the name, not the IP)."""
    host = conn._dns_host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, conn.port, allowed_gai_family(), socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    first_refusal, error = None, None
    for family, kind, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
        reason = guard.check(scheme, conn.host, conn.port, address)
        if reason is not None:
            first_refusal = first_refusal or AddressRefused(conn.host, conn.port, str(address), reason)
            continue
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            if conn.timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(conn.timeout)
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(sockaddr)  # the address just checked, not a second lookup
            return sock
        except OSError as exc:
            error = exc
            if sock is not None:
                sock.close()
    if error is None and first_refusal is not None:
        raise first_refusal  # nothing approved: no connection was attempted
    if isinstance(error, socket.timeout):
        raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})")
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error or 'no address'}")


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections (http and https) go through ``_guarded_connect``.

    Mount it for both schemes on a Session with ``trust_env = False``: a proxy would resolve the target
    itself, out of reach of the check.
    """

    def __init__(self, guard: UrlGuard, **kwargs):
        class Connection(HTTPConnection):
            def _new_conn(self):
                return _guarded_connect(self, guard, "http")

        class TLSConnection(HTTPSConnection):
            def _new_conn(self):
                return _guarded_connect(self, guard, "https")

        class Pool(HTTPConnectionPool):
            ConnectionCls = Connection

        class TLSPool(HTTPSConnectionPool):
            ConnectionCls = TLSConnection

        self._pools = {"http": Pool, "https": TLSPool}
        super().__init__(**kwargs)  # calls init_poolmanager, which needs self._pools

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools
