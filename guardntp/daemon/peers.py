"""How worker 0 asks the other ``--workers`` for their figures.

Rule: each worker's filter state lives in that worker alone, so ``guardntp
stats``, ``clients`` and the metrics, all served by worker 0, must ask the
others. The parent makes one Unix stream socketpair per other worker before it
forks; worker 0 keeps one end of each (:class:`PeerLinks`), worker i the other
(:class:`PeerAnswerer`, a reader on its own event loop). A message is a 4-byte
big-endian length and a JSON object; a question carries a sequence number that
the answer repeats, so an answer that came too late for one question is never
taken for the next one's.

A worker that does not answer within ``PEER_TIMEOUT_S`` is left out, and the
reply says how many answered: an operator sees a partial figure as partial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("guardntp")

#: How long worker 0 waits for the others; they answer from their packet loops.
PEER_TIMEOUT_S = 2.0
#: A ``clients`` answer of 5,000 rows is under 2 MB; anything far larger is a fault.
MAX_FRAME = 64 << 20
_LENGTH = struct.Struct("!I")


class PeerError(Exception):
    """A malformed, oversized or missing message on a worker link."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def read_frame(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """One message from a blocking socket, before the monotonic ``deadline``."""
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size, deadline))
    if length > MAX_FRAME:
        raise PeerError(f"message of {length} bytes is over the {MAX_FRAME}-byte limit")
    try:
        message = json.loads(_read_exactly(sock, length, deadline))
    except (ValueError, RecursionError) as error:
        raise PeerError(f"malformed message: {error}") from None
    if not isinstance(message, dict):
        raise PeerError("malformed message: not a JSON object")
    return message


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerError("no answer in time")
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise PeerError("the link is closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class PeerLinks:
    """Worker 0's side: ask every other worker one question, gather the answers.

    Thread-safe: the metrics endpoint asks from its own thread, the control
    socket from the packet loop.
    """

    def __init__(self, sockets: list[socket.socket], timeout_s: float = PEER_TIMEOUT_S) -> None:
        self.sockets = sockets
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sequence = 0
        for sock in sockets:
            sock.setblocking(True)

    def __len__(self) -> int:
        return len(self.sockets)

    def ask(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The answers of the workers that answered in time (the others are logged)."""
        with self._lock:
            self._sequence += 1
            question = encode_frame({**request, "sequence": self._sequence})
            deadline = time.monotonic() + self.timeout_s
            asked: list[tuple[int, socket.socket]] = []
            for index, sock in enumerate(self.sockets, start=1):
                try:
                    sock.sendall(question)
                    asked.append((index, sock))
                except OSError as error:
                    log.warning("worker %d: cannot ask for figures: %s", index, error.strerror)
            answers = []
            for index, sock in asked:
                try:
                    answers.append(self._answer_to(sock, self._sequence, deadline))
                except (PeerError, OSError) as error:
                    log.warning("worker %d: no figures: %s", index, error)
            return answers

    @staticmethod
    def _answer_to(sock: socket.socket, sequence: int, deadline: float) -> dict[str, Any]:
        while True:
            answer = read_frame(sock, deadline)
            if answer.get("sequence") == sequence:
                answer.pop("sequence")
                return answer
            # A late answer to an earlier question: skip it.

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class _Loop(Protocol):
    def add_reader(self, fileobj: socket.socket,
                   callback: Callable[[socket.socket], None]) -> None: ...

    def remove_reader(self, fileobj: socket.socket) -> None: ...


class _Answers(Protocol):
    def answer_peer(self, request: dict[str, Any]) -> dict[str, Any]: ...


class PeerAnswerer:
    """Worker i's side: answer worker 0's questions from the packet loop."""

    def __init__(self, sock: socket.socket, answers: _Answers, loop: _Loop,
                 timeout_s: float = PEER_TIMEOUT_S) -> None:
        self.sock = sock
        self.answers = answers
        self.loop = loop
        self.timeout_s = timeout_s
        sock.setblocking(True)
        loop.add_reader(sock, self._on_readable)

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            request = read_frame(sock, time.monotonic() + self.timeout_s)
            sequence = request.pop("sequence", None)
            answer = self.answers.answer_peer(request)
            sock.sendall(encode_frame({**answer, "sequence": sequence}))
        except (PeerError, OSError) as error:
            # Worker 0 is gone or spoke nonsense: its parent stops us all soon.
            log.warning("link to worker 0: %s; no longer answering it", error)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.loop.remove_reader(self.sock)
        self.sock.close()
