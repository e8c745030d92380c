"""The local control socket: one JSON request, one JSON reply, over AF_UNIX SOCK_SEQPACKET.

Rule: this is an edge, and it lives on the packet loop, so nothing here may
block or raise into the loop: the listening socket and every connection are
non-blocking, a connection gets one request and one reply and is closed, a
request is checked (size, nesting, encoding, shape) before anything acts on it,
every failure becomes a one-line error reply, idle connections are closed by a
timer, and their number is capped without ever shutting the operator out.

Why SOCK_SEQPACKET: it keeps message boundaries like a datagram socket (one
``recv`` is one whole request, one ``send`` one whole reply, no framing, no
partial writes to resume) yet is connected, so the server learns the peer's
credentials (SO_PEERCRED) and the client needs no address of its own.

Who may talk to it: the socket (0600) sits in a 0700 directory owned by the
server's user, and each peer's uid is checked anyway (root or the server's own
uid), so a directory made too open by mistake still lets no one else in.
Nothing in the state directory is reached through a symbolic link.
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..quoting import one_line, shown

log = logging.getLogger("guardntp.control")

DIRECTORY = "control"
SOCKET_NAME = "guardntp.sock"
#: A request is a small JSON object; anything longer is refused.
MAX_REQUEST = 16 * 1024
#: Arrays/objects nested deeper than this are refused before parsing: requests are
#: flat, and deep nesting makes the JSON parser recurse on the packet loop's stack.
MAX_DEPTH = 8
#: Connections open at once; when full, an idle one makes room (see eviction_victim).
MAX_CONNECTIONS = 16
#: Connections the kernel queues before accept; generous, so a connect flood does
#: not make an operator's connect wait behind it.
BACKLOG = 64
#: Accepts per wake-up, so a connect flood cannot hold the loop.
ACCEPT_BATCH = 16
#: A connection that has sent nothing for this long is closed by the sweep. Clients
#: send their request right after connecting, so idle sockets need not live long
#: (the sweep runs every second, so one lives 1-2 s).
IDLE_TIMEOUT_S = 1.0
#: The reply buffer asked for (the kernel caps it at 2 x net.core.wmem_max).
WANT_SNDBUF = 8 * 1024 * 1024
#: Biggest reply a client takes.
MAX_REPLY = 32 * 1024 * 1024
#: How often a path held by another server's socket is probed again (it may have died).
FOREIGN_RECHECK_S = 30.0
#: A client retries this often when the server closed without reading its request.
CLIENT_ATTEMPTS = 3
#: sun_path holds 108 bytes; deeper state directories are reached through /proc/self/fd.
_SUN_PATH_MAX = 107
_PEERCRED = struct.Struct("3i")
_PROC_FD = os.path.isdir("/proc/self/fd")
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Handler = Callable[[dict[str, Any], int], dict[str, Any]]


class ControlError(Exception):
    """The control socket cannot be used; the message says why and what to do."""


class BadRequest(ValueError):
    """A request that cannot be acted on; the message is the one-line reason."""


def peer_allowed(peer_uid: int, server_uid: int) -> bool:
    """Root, or the user the server runs as."""
    return peer_uid in (0, server_uid)


def socket_path(state_dir: Path) -> Path:
    return state_dir / DIRECTORY / SOCKET_NAME


# ---------------------------------------------------------------------------- protocol (pure)

def max_nesting(data: bytes) -> int:
    """How deep arrays and objects nest in ``data``; brackets inside strings do not count."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:    # backslash
                escaped = True
            elif byte == 0x22:    # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D) and depth:  # ] }
            depth -= 1
    return deepest


def parse_request(data: bytes) -> dict[str, Any]:
    """The request in ``data``: a JSON object with a string "command"; else BadRequest."""
    if len(data) > MAX_REQUEST:
        raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
    # Counting first keeps the byte-by-byte scan off every ordinary (flat) request.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and max_nesting(data) > MAX_DEPTH:
        raise BadRequest(f"request nests arrays or objects deeper than {MAX_DEPTH} levels")
    try:
        request = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadRequest("request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise BadRequest('request must be a JSON object with a "command"')
    return request


def eviction_victim(peers: Sequence[tuple[int, bool]]) -> int:
    """Which idle connection makes room: ``peers`` are (pid, refused) oldest first.

    A peer that may not ask goes first; then the oldest connection of the process
    holding the most. A process re-opening idle connections in a loop thus only
    ever evicts its own, and a lone ``guardntp stats`` is not among the victims.
    """
    for index, (_, refused) in enumerate(peers):
        if refused:
            return index
    held = Counter(pid for pid, _ in peers)
    most = max(held.values())
    return next(index for index, (pid, _) in enumerate(peers) if held[pid] == most)


def _error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode()


# ---------------------------------------------------------------------------- paths

@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A path short enough for sun_path: as is, or via an open fd of its directory."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, _NOFOLLOW_DIR)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _lstat(path: Path) -> os.stat_result | None:
    """``lstat`` of ``path``, or None when it (or its directory) is not there."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _answers(address: str) -> bool:
    """Does a live server listen at ``address``? Never waits (this runs on the loop)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.setblocking(False)
    try:
        probe.connect(address)
        return True
    except BlockingIOError:  # its backlog is full: alive
        return True
    except OSError:
        return False
    finally:
        probe.close()


# ---------------------------------------------------------------------------- server

class _Pending(NamedTuple):
    deadline: float
    #: The reply for a peer that may not ask (sent once its request is read), else None.
    refusal: bytes | None
    pid: int


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
        self.owner = owner
        self.uid = os.geteuid() if owner is None else owner[0]
        #: Connections waiting for their request, oldest first.
        self.connections: dict[socket.socket, _Pending] = {}
        self.refused = 0
        self.requests = 0
        #: Requests answered with an error (malformed, unknown, or failed).
        self.errors = 0
        #: Idle connections closed to make room for a new one.
        self.evicted = 0
        #: (st_dev, st_ino) of the socket we bound: the path is ours while it matches.
        self._identity: tuple[int, int] = (0, 0)
        #: Another live server's socket at our path, and when to probe it again.
        self._foreign: tuple[tuple[int, int], float] | None = None
        #: The last problem with the path, logged once until it changes or clears.
        self._trouble: str | None = None
        self.listener = self._listen()
        add_reader(self.listener, self._on_accept)

    # ------------------------------------------------------------ the socket file

    def _listen(self) -> socket.socket:
        """Bind a fresh listening socket at ``self.path``; raise ControlError."""
        fd = self._open_directory()
        try:
            self._clear_leftover(fd)
            return self._bind(fd)
        finally:
            os.close(fd)

    def _open_directory(self) -> int:
        """The control directory (made 0700 if missing), opened without following links."""
        directory = self.path.parent
        state_dir = directory.parent
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            state_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise ControlError(f"{state_dir}: {error.strerror}") from None
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(DIRECTORY, 0o700, dir_fd=state_fd)
            info = os.stat(DIRECTORY, dir_fd=state_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise ControlError(f"{directory} is a symbolic link; guardntp follows none "
                                   "in its state directory: remove it")
            if not stat.S_ISDIR(info.st_mode):
                raise ControlError(f"{directory} is not a directory: remove it")
            fd = os.open(DIRECTORY, _NOFOLLOW_DIR, dir_fd=state_fd)
        except OSError as error:
            raise ControlError(f"{directory}: {error.strerror}") from None
        finally:
            os.close(state_fd)
        try:
            info = os.fstat(fd)
            if info.st_uid not in (self.uid, os.geteuid()):
                raise ControlError(f"{directory} belongs to uid {info.st_uid}, not to the "
                                   f"server's uid {self.uid}: remove it or fix its owner")
            if stat.S_IMODE(info.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
            if self.owner is not None and os.geteuid() == 0:
                os.fchown(fd, *self.owner)
        except OSError as error:
            os.close(fd)
            raise ControlError(f"{directory}: {error.strerror}") from None
        except ControlError:
            os.close(fd)
            raise
        return fd

    def _address(self, fd: int) -> str:
        """Where to bind or probe: through the directory fd, so no link is followed on
        the way (and any depth fits sun_path); the plain path only without /proc."""
        return f"/proc/self/fd/{fd}/{SOCKET_NAME}" if _PROC_FD else str(self.path)

    def _clear_leftover(self, fd: int) -> None:
        """Remove what a killed server left at the socket's name (never following it)."""
        try:
            info = os.stat(SOCKET_NAME, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as error:
            raise ControlError(f"{self.path}: {error.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            raise ControlError(f"{self.path} is a directory: remove it")
        if stat.S_ISSOCK(info.st_mode) and _answers(self._address(fd)):
            raise ControlError(f"another guardntp server already uses {self.path} "
                               "(give each server its own --state-dir)")
        try:
            os.unlink(SOCKET_NAME, dir_fd=fd)
        except OSError as error:
            raise ControlError(f"{self.path}: {error.strerror}") from None

    def _bind(self, fd: int) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bound = False
        try:
            # Born 0600: a chmod by path after bind could be sent elsewhere by a link.
            mask = os.umask(0o177)
            try:
                listener.bind(self._address(fd))
                bound = True
            finally:
                os.umask(mask)
            if self.owner is not None and os.geteuid() == 0:
                os.chown(SOCKET_NAME, *self.owner, dir_fd=fd, follow_symlinks=False)
            info = os.stat(SOCKET_NAME, dir_fd=fd, follow_symlinks=False)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(SOCKET_NAME, dir_fd=fd)
            raise ControlError(f"control socket {self.path}: {error.strerror}") from None
        self._identity = (info.st_dev, info.st_ino)
        return listener

    def _is_ours(self, info: os.stat_result | None) -> bool:
        return info is not None and (info.st_dev, info.st_ino) == self._identity

    def _check_socket(self, now: float) -> None:
        """Re-create the socket if its path no longer leads to it (the state directory
        was removed, say), unless another live server holds the path now."""
        info = _lstat(self.path)
        if self._is_ours(info) and not os.path.islink(self.path.parent):
            self._foreign = None
            self._trouble = None
            return
        if info is not None and stat.S_ISSOCK(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if self._foreign is not None and self._foreign[0] == key and now < self._foreign[1]:
                return
            with _short_path(self.path) as address:
                alive = _answers(address)
            if alive:
                self._foreign = (key, now + FOREIGN_RECHECK_S)
                self._report(f"control socket {self.path} now belongs to another running "
                             "server; leaving it alone (give each server its own --state-dir)")
                return
        try:
            listener = self._listen()
        except ControlError as error:
            self._report(f"control socket {self.path} is gone and cannot be re-created: "
                         f"{error} (retrying every sweep)")
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.remove_reader(self.listener)
        self.listener.close()
        self.listener = listener
        self.add_reader(listener, self._on_accept)
        self._foreign = None
        self._trouble = None
        log.warning("control socket %s was gone (state directory removed?); re-created it",
                    self.path)

    def _report(self, message: str) -> None:
        if message != self._trouble:
            log.warning("%s", message)
            self._trouble = message

    # ------------------------------------------------------------ connections

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("accept: %s", error)
                return
            try:
                self._admit(connection)
            except Exception as error:  # nothing here may end the packet loop
                log.error("control: accept failed: %s: %s", type(error).__name__,
                          one_line(error))
                with contextlib.suppress(Exception):
                    self._close(connection)

    def _admit(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        pid, uid, _ = _PEERCRED.unpack(connection.getsockopt(
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
        self.connections[connection] = _Pending(time.monotonic() + IDLE_TIMEOUT_S, refusal,
                                                pid)
        self.add_reader(connection, self._on_request)
        # Clients send at once, so the request is usually here already and is answered
        # without holding a place; only a connection that stays idle needs one.
        self._on_request(connection)
        if len(self.connections) > MAX_CONNECTIONS:
            self._make_room()

    def _make_room(self) -> None:
        entries = list(self.connections.items())
        victim = entries[eviction_victim(
            [(entry.pid, entry.refusal is not None) for _, entry in entries])][0]
        self._on_request(victim)  # a request that is waiting is answered, not dropped
        if victim in self.connections:
            self.evicted += 1
            self._close(victim)  # it sent nothing, so it sees a plain end of file

    def _on_request(self, connection: socket.socket) -> None:
        try:
            self._serve(connection)
        except Exception as error:  # nothing here may end the packet loop
            log.error("control: connection failed: %s: %s", type(error).__name__,
                      one_line(error))
            with contextlib.suppress(Exception):
                self._close(connection)

    def _serve(self, connection: socket.socket) -> None:
        entry = self.connections.get(connection)
        if entry is None:
            return
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
        if entry.refusal is not None:
            self._reply_and_close(connection, entry.refusal)
            return
        self.requests += 1
        max_reply = connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64
        self._reply_and_close(connection, self.answer(data, max_reply))

    def answer(self, data: bytes, max_reply: int) -> bytes:
        """The reply to one request (bad requests get an error reply, never an exception)."""
        try:
            request = parse_request(data)
        except BadRequest as error:
            return self._failed(f"bad request: {error}", str(error))
        command = request["command"]
        handler = self.handlers.get(command)
        if handler is None:
            return self._failed(
                f"unknown command {shown(command)}",
                f"unknown command {shown(command)} (known: "
                + ", ".join(sorted(self.handlers)) + ")")
        try:
            reply = handler(request, max_reply)
        except (ValueError, OSError) as error:  # a bad argument, or a file the command read
            return self._failed(f"{command}: {one_line(error)}", one_line(error))
        except Exception as error:  # a bug in a report must not take the server down
            return self._bug(command, error)
        try:
            encoded = json.dumps({"ok": True, **reply}).encode()
        except Exception as error:  # a handler returned what JSON cannot carry
            return self._bug(command, error)
        if len(encoded) > max_reply:
            return self._failed(f"{command}: reply of {len(encoded)} bytes is too large",
                                f"reply of {len(encoded)} bytes is too large for the "
                                "socket buffer")
        return encoded

    def _failed(self, logged: str, message: str) -> bytes:
        self.errors += 1
        log.warning("control: %s", logged)
        return _error(message)

    def _bug(self, command: str, error: Exception) -> bytes:
        self.errors += 1
        what = f"{command} failed: {type(error).__name__}: {one_line(error)}"
        log.error("control: %s", what)
        return _error(what)

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

    def sweep(self, now: float | None = None) -> None:
        """The periodic task: close connections that sent nothing in time, and put the
        socket back if its path no longer leads to it."""
        now = time.monotonic() if now is None else now
        for connection, entry in list(self.connections.items()):
            if now >= entry.deadline:
                # Late is not idle: a request that is waiting (the loop was busy) is
                # answered; closing over unread data would reset the client instead.
                self._on_request(connection)
                if connection in self.connections:
                    self._close(connection)
        try:
            self._check_socket(now)
        except Exception as error:  # a timer must not log a traceback every second
            self._report(f"control socket {self.path}: check failed: "
                         f"{type(error).__name__}: {one_line(error)}")

    def close(self) -> None:
        for connection in list(self.connections):
            self._close(connection)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.remove_reader(self.listener)
        self.listener.close()
        # Only our own socket: a newer server may already have bound this path.
        if self._is_ours(_lstat(self.path)):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


# ---------------------------------------------------------------------------- client

def request(state_dir: Path, message: dict[str, Any], timeout_s: float = 10.0
            ) -> dict[str, Any]:
    """Send one request to the server of ``state_dir``; raise :class:`ControlError`.

    A connection the server closed before reading the request (it made room for
    another) is tried again, a few times within ``timeout_s``: the request was
    never acted on.
    """
    path = socket_path(state_dir)
    payload = json.dumps(message).encode()
    deadline = time.monotonic() + timeout_s
    data: bytes | None = None
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        left = deadline - time.monotonic()
        data = _exchange(path, state_dir, payload, max(0.05, left), timeout_s,
                         last=attempt == CLIENT_ATTEMPTS or left <= 0.05)
        if data is not None:
            break
        time.sleep(0.01 * attempt)
    if not data:
        raise ControlError(f"the server behind {path} closed the connection without a reply")
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise ControlError(f"the server behind {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the server behind {path} sent an unexpected reply")
    return reply


def _exchange(path: Path, state_dir: Path, payload: bytes, wait_s: float, timeout_s: float,
              last: bool) -> bytes | None:
    """The reply's bytes; None when the server dropped the connection unread and this
    is not the ``last`` attempt (then b"" stands for "closed without a reply")."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Blocking, with the kernel's timeouts rather than settimeout(): a non-blocking
    # connect fails at once (EAGAIN) while the server's accept queue is full, a
    # blocking one waits in that queue and is woken as soon as the server accepts.
    seconds = int(wait_s)
    limit = struct.pack("ll", seconds, int((wait_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    try:
        with _short_path(path) as address:
            sock.connect(address)
        sock.send(payload)
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
    except (BlockingIOError, TimeoutError):  # a kernel timeout expired: EAGAIN
        raise ControlError(f"the server behind {path} did not answer within "
                           f"{timeout_s:g} s") from None
    except (ConnectionResetError, BrokenPipeError) as error:
        if not last:
            return None
        raise ControlError(f"{path}: {error.strerror}") from None
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            raise ControlError(f"{path}: not a control socket") from None
        raise ControlError(f"{path}: {error.strerror}") from None
    finally:
        sock.close()
    if not data and not last:
        return None
    return data
