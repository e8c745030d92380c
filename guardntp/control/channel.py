"""The local control socket: one JSON request, one JSON reply, over AF_UNIX SOCK_SEQPACKET.

Rule: this is an edge, and it lives on the packet loop, so nothing here may
block: the listening socket and every connection are non-blocking, a
connection gets one request and one reply and is closed, idle connections are
closed by a timer, and their number is capped.

Why SOCK_SEQPACKET: it keeps message boundaries like a datagram socket (one
``recv`` is one whole request, one ``send`` one whole reply, no framing, no
partial writes to resume) yet is connected, so the server learns the peer's
credentials (SO_PEERCRED) and the client needs no address of its own.

Who may talk to it: the socket sits in a 0700 directory owned by the server's
user, and each peer's uid is checked anyway (root or the server's own uid),
so a directory made too open by mistake still lets no one else in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("guardntp.control")

DIRECTORY = "control"
SOCKET_NAME = "guardntp.sock"
#: A request is a small JSON object; anything longer is refused.
MAX_REQUEST = 16 * 1024
#: Connections open at once; more are refused at accept.
MAX_CONNECTIONS = 16
#: Accepts per wake-up, so a connect flood cannot hold the loop.
ACCEPT_BATCH = 16
#: A connection that sends nothing for this long is closed by the sweep.
IDLE_TIMEOUT_S = 5.0
#: The reply buffer asked for (the kernel caps it at 2 x net.core.wmem_max).
WANT_SNDBUF = 8 * 1024 * 1024
#: Biggest reply a client takes.
MAX_REPLY = 32 * 1024 * 1024
#: sun_path holds 108 bytes; deeper state directories are reached through /proc/self/fd.
_SUN_PATH_MAX = 107
_PEERCRED = struct.Struct("3i")

Handler = Callable[[dict[str, Any], int], dict[str, Any]]


class ControlError(Exception):
    """The control socket cannot be used; the message says why and what to do."""


def peer_allowed(peer_uid: int, server_uid: int) -> bool:
    """Root, or the user the server runs as."""
    return peer_uid in (0, server_uid)


def socket_path(state_dir: Path) -> Path:
    return state_dir / DIRECTORY / SOCKET_NAME


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A path short enough for sun_path: as is, or via an open fd of its directory."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- server

class ControlServer:
    """Accepts connections on the loop; ``handlers[command](request, max_reply)`` answers."""

    def __init__(self, state_dir: Path, handlers: dict[str, Handler],
                 add_reader: Callable[[socket.socket, Callable[[socket.socket], None]], None],
                 remove_reader: Callable[[socket.socket], None],
                 owner: tuple[int, int] | None = None) -> None:
        """``owner``: (uid, gid) the server drops to after start; it gets the directory."""
        self.path = socket_path(state_dir)
        self.handlers = handlers
        self.add_reader = add_reader
        self.remove_reader = remove_reader
        self.uid = os.geteuid() if owner is None else owner[0]
        #: connection -> (idle deadline, refusal reply for a peer that may not ask)
        self.connections: dict[socket.socket, tuple[float, bytes | None]] = {}
        self.refused = 0
        self.requests = 0
        self._prepare_directory()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with _short_path(self.path) as address:
                self.listener.bind(address)
            os.chmod(self.path, 0o600)
            if owner is not None:
                os.chown(self.path, *owner)
                os.chown(self.path.parent, *owner)
            self.listener.listen(MAX_CONNECTIONS)
        except OSError as error:
            self.listener.close()
            raise ControlError(f"control socket {self.path}: {error.strerror}") from None
        self._inode = self.path.stat().st_ino
        self.listener.setblocking(False)
        add_reader(self.listener, self._on_accept)

    def _prepare_directory(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
            if info.st_uid not in (self.uid, os.geteuid()):
                raise ControlError(f"{directory} belongs to uid {info.st_uid}, not to the "
                                   f"server's uid {self.uid}: remove it or fix its owner")
            if stat.S_IMODE(info.st_mode) != 0o700:
                os.chmod(directory, 0o700)
        except OSError as error:
            raise ControlError(f"{directory}: {error.strerror}") from None
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ControlError(f"another guardntp server already uses {self.path} "
                                   "(give each server its own --state-dir)")
            self.path.unlink()  # left behind by a server that was killed

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("accept: %s", error)
                return
            connection.setblocking(False)
            if len(self.connections) >= MAX_CONNECTIONS:
                self.refused += 1
                connection.close()  # the client reports "closed without a reply"
                continue
            _, uid, _ = _PEERCRED.unpack(connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            refusal = None
            if not peer_allowed(uid, self.uid):
                self.refused += 1
                log.warning("control: refused a connection from uid %d", uid)
                refusal = _error(f"permission denied: uid {uid} is neither root nor the "
                                 f"server's uid {self.uid}")
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WANT_SNDBUF)
            # Even a refused peer is answered only after its request is read: closing a
            # socket with unread data resets it, and the peer would see no reason.
            self.connections[connection] = (time.monotonic() + IDLE_TIMEOUT_S, refusal)
            self.add_reader(connection, self._on_request)

    def _on_request(self, connection: socket.socket) -> None:
        try:
            data = connection.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if not data:
            self._close(connection)
            return
        refusal = self.connections[connection][1]
        if refusal is not None:
            self._reply_and_close(connection, refusal)
            return
        self.requests += 1
        max_reply = connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64
        self._reply_and_close(connection, self.answer(data, max_reply))

    def answer(self, data: bytes, max_reply: int) -> bytes:
        """The reply to one request (bad requests get an error reply, never an exception)."""
        if len(data) > MAX_REQUEST:
            return _error(f"request longer than {MAX_REQUEST} bytes")
        try:
            request = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return _error("request is not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return _error('request must be a JSON object with a "command"')
        handler = self.handlers.get(request["command"])
        if handler is None:
            return _error(f"unknown command {request['command']!r} (known: "
                          + ", ".join(sorted(self.handlers)) + ")")
        try:
            reply = handler(request, max_reply)
        except ValueError as error:  # a bad argument in the request
            return _error(str(error))
        except Exception as error:  # a bug in a report must not take the server down
            log.exception("control: %s failed", request["command"])
            return _error(f"{request['command']} failed: {error}")
        encoded = json.dumps({"ok": True, **reply}).encode()
        if len(encoded) > max_reply:
            return _error(f"reply of {len(encoded)} bytes is too large for the socket buffer")
        return encoded

    def _reply_and_close(self, connection: socket.socket, reply: bytes) -> None:
        try:
            connection.send(reply)
        except OSError as error:
            log.debug("control: send: %s", error)
        self._close(connection)

    def _close(self, connection: socket.socket) -> None:
        if self.connections.pop(connection, None) is not None:
            self.remove_reader(connection)
        connection.close()

    def sweep(self) -> None:
        """Close connections that sent no request in time (a periodic task)."""
        now = time.monotonic()
        for connection, (deadline, _) in list(self.connections.items()):
            if now >= deadline:
                self._close(connection)

    def close(self) -> None:
        for connection in list(self.connections):
            self._close(connection)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.remove_reader(self.listener)
        self.listener.close()
        with contextlib.suppress(OSError):
            # Only our own socket: a newer server may already have bound this path.
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()


def _error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode()


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(1.0)
    try:
        with _short_path(path) as address:
            probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# ---------------------------------------------------------------------------- client

def request(state_dir: Path, message: dict[str, Any], timeout_s: float = 10.0
            ) -> dict[str, Any]:
    """Send one request to the server of ``state_dir``; raise :class:`ControlError`."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    try:
        with _short_path(path) as address:
            sock.connect(address)
        sock.send(json.dumps(message).encode())
        data = sock.recv(MAX_REPLY)
    except FileNotFoundError:
        raise ControlError(f"no server is running with state directory {state_dir} "
                           f"(no {path}; pass the server's --state-dir)") from None
    except ConnectionRefusedError:
        raise ControlError(f"no server is running with state directory {state_dir} "
                           f"({path} is left over from a stopped server)") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied (run as root or as the server's "
                           "user)") from None
    except TimeoutError:
        raise ControlError(f"the server behind {path} did not answer within "
                           f"{timeout_s:g} s") from None
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            raise ControlError(f"{path}: not a control socket") from None
        raise ControlError(f"{path}: {error.strerror}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the server behind {path} closed the connection without a reply")
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the server behind {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the server behind {path} sent an unexpected reply")
    return reply
