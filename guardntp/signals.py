"""Signals whose work runs from the server loop, never inside the signal handler.

Rule: a Python signal handler runs between two bytecodes of whatever the main
thread was doing, possibly in the middle of ``Pipeline.decide`` or a table
update. So the handler only records the signal; ``signal.set_wakeup_fd``
writes a byte to a socket pair that the loop's selector watches, and the
callback runs from the loop at once (no polling delay), between packets.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("guardntp.server")


class _Loop(Protocol):
    def add_reader(self, fileobj: socket.socket, callback: Callable[[socket.socket], None]
                   ) -> None: ...


class DeferredSignals:
    """``on(SIGHUP, service.reload_from_signal)``: run callbacks from the loop."""

    def __init__(self, loop: _Loop) -> None:
        self._receive, self._send = socket.socketpair()
        self._receive.setblocking(False)
        self._send.setblocking(False)
        self._pending: set[int] = set()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._send.fileno(),
                                                        warn_on_full_buffer=False)
        loop.add_reader(self._receive, self._drain)

    def on(self, signum: int, callback: Callable[[], None]) -> None:
        self._callbacks[signum] = callback
        signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self._pending.add(signum)  # the wake-up byte is written by the interpreter

    def _drain(self, _sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._receive.recv(64):
                pass
        pending, self._pending = self._pending, set()
        for signum in sorted(pending):
            callback = self._callbacks.get(signum)
            if callback is None:
                continue
            try:
                callback()
            except Exception:  # a bad reload must never take the server down
                log.exception("handling %s failed", signal.Signals(signum).name)

    def close(self) -> None:
        for signum in self._callbacks:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._receive.close()
        self._send.close()
