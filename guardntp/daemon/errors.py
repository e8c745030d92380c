"""The daemon's own error: the command line prints it and exits with ``status``."""

from __future__ import annotations

from ..control.service import ReloadFailed


class DaemonError(Exception):
    """The server cannot start or go on, for a reason the operator can fix.

    The message is one line. ``status`` is the exit code: 2 for a bad
    configuration, 1 for anything else (a busy port, an unusable state directory).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class ReloadRejected(ReloadFailed):
    """A reload found the new configuration unusable; nothing of it was applied."""
