"""The control socket's commands, wired to a running :class:`~guardntp.commands.serve.Service`.

Rule: the glue. Reports come from ``reports.py`` (pure), the socket from
``channel.py``; here each command is bound to the service it reports on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..blocklist.auto import BadAutoSettings, parse_auto_policy
from ..blocklist.live import future_owner
from ..config import ConfigError
from .channel import ControlError, ControlServer
from .reports import SORT_KEYS, client_rows, stats_report

if TYPE_CHECKING:
    from ..commands.serve import Service

log = logging.getLogger("guardntp.control")

#: The idle-connection sweep; a second is plenty for a 5 s timeout.
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


class ControlCommands:
    """``clients``, ``stats`` and ``reload`` for one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.started = time.monotonic()

    def handlers(self) -> dict[str, Any]:
        return {"clients": self.clients, "stats": self.stats, "reload": self.reload}

    def clients(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        sort = request.get("sort", "requests")
        if sort not in SORT_KEYS:
            raise ValueError(f"unknown sort {sort!r} (known: {', '.join(SORT_KEYS)})")
        limit = request.get("limit", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a whole number >= 0")
        records = self.service.pipeline.sources.records
        # A reply is one message (rows are under 256 bytes each) and is built on the
        # packet loop: at most MAX_ROWS (~40 ms for a full table), the top ones first.
        fitting = min(MAX_ROWS, max(1, (max_reply - 1024) // 256))
        wanted = fitting if limit == 0 else min(limit, fitting)
        rows = client_rows(records, time.monotonic_ns(), sort, wanted)
        truncated = wanted < min(limit or len(records), len(records))
        return {"clients": rows, "total": len(records), "truncated": truncated}

    def stats(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        service = self.service
        report = stats_report(service.pipeline)
        report["uptime_s"] = round(time.monotonic() - self.started, 1)
        report["send_errors"] = service.server.send_errors
        report["truncated"] = service.server.truncated
        live = getattr(service, "blocklist", None)
        if live is not None:
            report["blocklist"] = {
                "active_entries": live.active_entries, "loads": live.loads,
                "auto": live.auto.policy.enabled, "auto_blocked": live.auto_blocked,
                "watched": len(live.auto.suspects), "error": live.last_error}
        return report

    def reload(self, request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        """Re-read the configuration; a bad file is reported and the running one kept."""
        from ..cli import CommandError
        from ..commands.serve import build_config

        service = self.service
        try:
            # Check the sections this feature owns before anything is applied.
            fresh = build_config(service.args)
            parse_auto_policy(fresh.extra.get("blocklist", {}))
            parse_control_settings(fresh.extra.get("control", {}))
            message = service.reload()
        except (CommandError, ConfigError, BadAutoSettings, ValueError) as error:
            log.error("reload refused: %s (the running configuration is kept)", error)
            return {"reloaded": False, "error": str(error)}
        return {"reloaded": True, "message": message}


def setup_control(service: Service) -> ControlServer | None:
    """Open the control socket under the state directory and serve it on the loop."""
    from ..cli import CommandError

    try:
        enabled = parse_control_settings(service.config.extra.get("control", {}))
    except ValueError as error:
        raise CommandError(f"{service.config.path}: {error}", 2) from None
    if not enabled:
        return None
    commands = ControlCommands(service)
    try:
        control = ControlServer(service.state_dir, commands.handlers(),
                                service.server.add_reader, service.server.remove_reader,
                                future_owner(service))
    except ControlError as error:
        raise CommandError(str(error)) from None
    service.server.add_periodic(SWEEP_S, control.sweep)
    log.info("control socket %s", control.path)
    return control
