"""The control socket's commands, wired to the parts of a running server they report on.

Rule: the glue. Reports come from ``reports.py`` (pure), merging the workers'
figures from ``merge.py`` (pure), the socket from ``channel.py``; here each
command is bound to the pipeline, loop and blocklist it reports on, and to the
reload callable it was given. With ``--workers`` worker 0 is given ``peers``,
something that asks the other workers the same question, and adds up their
answers; each worker answers such a question with :meth:`ControlCommands.answer_peer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..blocklist.live import LiveBlocklist
from ..filter.pipeline import Pipeline
from ..metrics import counter_snapshot
from .channel import ControlServer
from .merge import merge_client_rows, merge_stats
from .reports import SORT_KEYS, client_rows, stats_report

log = logging.getLogger("guardntp.control")

#: The idle-connection sweep, and the check that the socket is still ours.
SWEEP_S = 1.0
#: Rows one ``clients`` reply carries at most.
MAX_ROWS = 5000
_CONTROL_KEYS = ("enabled",)


def parse_control_settings(table: Mapping[str, Any]) -> bool:
    """``[control]``: is the socket enabled? Raises ValueError naming the key."""
    for key in table:
        if key not in _CONTROL_KEYS:
            raise ValueError(f"control.{key}: unknown setting (known: "
                             + ", ".join(_CONTROL_KEYS) + ")")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError("control.enabled: must be true or false")
    return enabled


class _Loop(Protocol):
    """What the commands use of the server's event loop and socket counters."""

    send_errors: int
    truncated: int
    decision_errors: int

    def add_reader(self, fileobj: Any, callback: Callable[[Any], None]) -> None: ...

    def remove_reader(self, fileobj: Any) -> None: ...

    def add_periodic(self, interval_s: float, callback: Callable[[], None]) -> None: ...


class _Peers(Protocol):
    def __len__(self) -> int: ...

    def ask(self, request: dict[str, Any]) -> list[dict[str, Any]]: ...


class _SelectingSource(Protocol):
    """A time source that chooses among upstreams (``--clock upstream``)."""

    def selection_report(self) -> list[dict[str, object]]: ...

    def selection_summary(self) -> dict[str, object]: ...


class ReloadFailed(Exception):
    """What a reload callable raises when it kept the running configuration."""


class ControlCommands:
    """``clients``, ``stats`` and ``reload`` for one server (all its workers)."""

    def __init__(self, pipeline: Pipeline, loop: _Loop, blocklist: LiveBlocklist | None,
                 reload: Callable[[], str], peers: _Peers | None = None,
                 upstreams: _SelectingSource | None = None,
                 nts: Callable[[], dict[str, Any]] | None = None) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self.nts = nts
        self.loop = loop
        self.blocklist = blocklist
        self.reload_config = reload
        self.peers = peers
        self.started = time.monotonic()

    def handlers(self) -> dict[str, Any]:
        return {"clients": self.clients, "stats": self.stats, "reload": self.reload}

    def clients(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        sort = request.get("sort", "requests")
        if not isinstance(sort, str) or sort not in SORT_KEYS:
            raise ValueError(f"unknown sort {sort!r} (known: {', '.join(SORT_KEYS)})")
        limit = request.get("limit", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a whole number >= 0")
        # A reply is one message (rows are under 256 bytes each) and is built on the
        # packet loop: at most MAX_ROWS (~40 ms for a full table), the top ones first.
        fitting = min(MAX_ROWS, max(1, (max_reply - 1024) // 256))
        wanted = fitting if limit == 0 else min(limit, fitting)
        answers = [self._local_clients(sort, wanted)]
        if self.peers:
            answers += self.peers.ask({"command": "clients", "sort": sort, "limit": wanted})
        rows = merge_client_rows([answer["clients"] for answer in answers], sort, wanted)
        total = sum(int(answer["total"]) for answer in answers)
        truncated = wanted < min(limit or total, total)
        return {"clients": rows, "total": total, "truncated": truncated,
                **self._workers(len(answers))}

    def _local_clients(self, sort: str, wanted: int) -> dict[str, Any]:
        records = self.pipeline.sources.records
        return {"clients": client_rows(records, time.monotonic_ns(), sort, wanted),
                "total": len(records)}

    def stats(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        reports = [self._local_stats()]
        if self.peers:
            reports += self.peers.ask({"command": "stats"})
        report = merge_stats(reports)
        report["uptime_s"] = round(time.monotonic() - self.started, 1)
        live = self.blocklist
        if live is not None:
            report["blocklist"] = {
                "active_entries": live.active_entries, "loads": live.loads,
                "auto": live.auto.policy.enabled, "auto_blocked": live.auto_blocked,
                "watched": len(live.auto.suspects), "error": live.last_error}
        if self.upstreams is not None:
            report["upstreams"] = self.upstreams.selection_report()
            report["selection"] = self.upstreams.selection_summary()
        return report | self._workers(len(reports))

    def _local_stats(self) -> dict[str, Any]:
        report = stats_report(self.pipeline)
        report["send_errors"] = self.loop.send_errors
        report["truncated"] = self.loop.truncated
        report["decision_errors"] = self.loop.decision_errors
        if self.nts is not None:
            report["nts"] = self.nts()
        return report

    def _workers(self, answered: int) -> dict[str, Any]:
        if self.peers is None:
            return {}
        return {"workers": len(self.peers) + 1, "workers_answered": answered}

    def answer_peer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Another worker's question: this worker's own figures only."""
        command = request.get("command")
        if command == "stats":
            return self._local_stats()
        if command == "snapshot":
            return counter_snapshot(self.pipeline, self.loop)
        if command == "clients":
            sort, limit = request.get("sort"), request.get("limit")
            if (isinstance(sort, str) and sort in SORT_KEYS and isinstance(limit, int)
                    and not isinstance(limit, bool) and limit > 0):
                return self._local_clients(sort, limit)
        return {"error": f"unknown question {command!r}"}

    def reload(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        """Re-read the configuration; a bad file is reported and the running one kept."""
        try:
            message = self.reload_config()
        except ReloadFailed as error:
            return {"reloaded": False, "error": str(error)}
        return {"reloaded": True, "message": message}


def setup_control(state_dir: Path, commands: ControlCommands, loop: _Loop,
                  owner: tuple[int, int] | None = None) -> ControlServer:
    """Open the control socket under the state directory and serve it on the loop.

    Raises :class:`~guardntp.control.channel.ControlError`.
    """
    control = ControlServer(state_dir, commands.handlers(), loop.add_reader,
                            loop.remove_reader, owner)
    loop.add_periodic(SWEEP_S, control.sweep)
    log.info("control socket %s", control.path)
    return control
