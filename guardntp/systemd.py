"""systemd integration: sockets passed by socket activation, and readiness notices.

Rule: this follows sd_listen_fds(3) and sd_notify(3) without libsystemd. A
socket-activated service finds ``LISTEN_PID`` (its own pid, so a child never
takes its parent's sockets) and ``LISTEN_FDS`` (how many) in its environment,
and the sockets themselves at fd 3, 4, ... ; the variables are then removed
so nothing started later inherits them. systemd binds port 123 for us, so the
service itself never needs root or CAP_NET_BIND_SERVICE.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from .server import SO_TIMESTAMPNS, enable_arrival_ttl

log = logging.getLogger("guardntp.systemd")

#: sd_listen_fds(3): SD_LISTEN_FDS_START
LISTEN_FDS_START = 3
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The sockets systemd passed cannot be used; one line for the operator."""


def listen_fd_numbers(environ: MutableMapping[str, str], pid: int) -> list[int]:
    """The inherited descriptors meant for process ``pid``; consumes the variables."""
    listen_pid = environ.get("LISTEN_PID", "")
    count = environ.get("LISTEN_FDS", "")
    for name in _ACTIVATION_VARIABLES:
        environ.pop(name, None)
    if not listen_pid or not count:
        return []
    if not listen_pid.isdigit() or int(listen_pid) != pid:
        return []  # meant for another process (we were started by a socket-activated one)
    if not count.isdigit() or not 0 < int(count) <= 64:
        raise ActivationError(f"LISTEN_FDS={count!r}: expected a count of sockets")
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))


def inherited_sockets(environ: MutableMapping[str, str] | None = None,
                      pid: int | None = None) -> list[socket.socket]:
    """UDP sockets passed by systemd (``ListenDatagram=``), ready for the server loop.

    Empty when the process was not socket-activated. Raises :class:`ActivationError`
    if a passed descriptor is not a bound UDP socket (a wrong ``.socket`` unit).
    """
    fds = listen_fd_numbers(os.environ if environ is None else environ,
                            os.getpid() if pid is None else pid)
    sockets = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise ActivationError(f"LISTEN_FDS: descriptor {fd}: {error.strerror}") from None
        if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET,
                                                                 socket.AF_INET6):
            sock.detach()
            raise ActivationError(f"LISTEN_FDS: descriptor {fd} is not a UDP socket "
                                  "(the .socket unit needs ListenDatagram=)")
        os.set_inheritable(fd, False)
        # systemd's Timestamping=ns sets this too; the unit may not say so.
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        enable_arrival_ttl(sock)   # each datagram's TTL / hop limit, for the filter
        sock.setblocking(False)
        sockets.append(sock)
    if sockets:
        log.info("using %d socket(s) from systemd: %s", len(sockets), describe_sockets(sockets))
    return sockets


def describe_sockets(sockets: list[socket.socket]) -> str:
    """``127.0.0.1:123, [::]:123``: what the sockets are bound to, for log lines."""
    names = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``READY=1`` / ``RELOADING=1`` / ``STOPPING=1`` to systemd (Type=notify).

    A no-op without ``NOTIFY_SOCKET``; never raises: a lost notice must not stop the server.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), target)
    except OSError as error:
        log.debug("sd_notify %s: %s", state, error)
        return False
    return True
