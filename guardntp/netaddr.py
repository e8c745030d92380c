"""Addresses as the filter sees them: packed bytes, and listen specs as the CLI takes them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

NTP_PORT = 123
_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


class BadAddress(ValueError):
    """A listen address, CIDR or host that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class ListenSpec:
    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _split_host_port(text: str) -> tuple[str, str | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address (stripped)
    -> (host, the port's text or None where none is written); BadAddress for a
    bracket that is not closed, or text after it that is not ``:PORT``."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise BadAddress(f"{text!r}: expected [IPV6]:PORT")
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, port_text = text.split(":")
        return host, port_text
    return text, None


def parse_listen(text: str, default_port: int = NTP_PORT) -> ListenSpec:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``.

    The host is never implied: every address is an explicit ``0.0.0.0`` or ``[::]``,
    so an empty value (an unset shell variable in ``--listen "$ADDR:123"``, say)
    cannot quietly open the server on every interface."""
    text = text.strip()
    if not text:
        raise BadAddress("empty listen address: expected HOST[:PORT], e.g. 192.0.2.1:123 "
                         "(0.0.0.0 or [::] for every address)")
    host, written = _split_host_port(text)
    port_text = written or ""
    if not host.strip():
        suffix = f":{port_text}" if port_text else ""
        raise BadAddress(f"{text!r}: no host: write 0.0.0.0{suffix} or [::]{suffix} "
                         "for every address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadAddress(f"{text!r}: {host!r} is not an IP address") from None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadAddress(f"{text!r}: port must be 1-65535")
        port = int(port_text)
    else:
        port = default_port
    return ListenSpec(host, port)


def parse_host_port(text: str, default_port: int = NTP_PORT) -> tuple[str, int]:
    """A server to send to: ``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6
    address; HOST may be a name (it is resolved later). Raises :class:`BadAddress`."""
    host, port_text = _split_host_port(text.strip())
    if not host or any(character.isspace() for character in host):
        raise BadAddress(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise BadAddress(f"{text!r}: port must be 1-65535")
    return host, int(port_text)


def packed_from_sockaddr(sockaddr: tuple[object, ...]) -> bytes:
    """The packed source address (4 or 16 bytes); IPv4-mapped IPv6 becomes 4 bytes."""
    host = str(sockaddr[0])
    if len(sockaddr) == 2:
        return socket.inet_aton(host)
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return packed[12:] if packed[:12] == _V4_MAPPED_PREFIX else packed

