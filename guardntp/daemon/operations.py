"""What ``guardntp serve`` does around the packet loop for the operator.

Rule: this is the edge that ties the operations features to the ``Service``:
sockets from systemd; SIGHUP -> ``Service.reload()`` run from the loop; the
metrics endpoint; the privilege drop; readiness notices to systemd.

Order at start (``Operations.start``): everything that may need root is done
first (sockets were bound by the Service; the metrics port is bound here),
then privileges are dropped, then systemd hears READY=1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

from .. import systemd
from ..config import Config
from ..logs import LogSettings, LogSetup
from ..metrics import (
    GuardntpCollector,
    MetricsEndpoint,
    MetricsError,
    make_registry,
    require_prometheus,
)
from ..nts.settings import NtsError
from ..privileges import Identity, PrivilegeError, chown_for, drop_privileges, resolve_identity
from ..signals import DeferredSignals
from .errors import DaemonError, ReloadRejected

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("guardntp")

#: How often windows of the log repeat limit are closed and their summaries written.
LOG_FLUSH_INTERVAL_S = 5.0


class Operations:
    """Created by ``Service.__init__``; :meth:`start` runs just before the loop."""

    def __init__(self, config: Config, log_setup: LogSetup | None = None,
                 notify_systemd: bool = True) -> None:
        self.log_setup = log_setup
        #: Workers leave readiness notices to the parent, the PID systemd listens to.
        self.notify = systemd.notify if notify_systemd else _no_notice
        self.reloads = {"ok": 0, "rejected": 0}
        self.metrics: MetricsEndpoint | None = None
        self.signals: DeferredSignals | None = None
        self.identity: Identity | None = None
        self.metrics_spec = config.extra.get("metrics", {}).get("listen")
        if config.server.user:
            try:
                self.identity = resolve_identity(config.server.user, config.server.group)
            except PrivilegeError as error:
                raise DaemonError(str(error), 2) from None
        elif config.server.group:
            raise DaemonError("--group needs --user (server.group needs server.user)", 2)
        if self.metrics_spec is not None:
            try:
                require_prometheus()  # fail before binding anything, not after
            except MetricsError as error:
                raise DaemonError(str(error)) from None

    def future_owner(self) -> tuple[int, int] | None:
        """(uid, gid) the server drops to after start (``server.user``), if it does."""
        if self.identity is None or os.geteuid() != 0:
            return None
        return int(self.identity.uid), int(self.identity.gid)

    def inherited_sockets(self) -> list[socket.socket]:
        """Sockets from systemd socket activation (empty if not socket-activated)."""
        try:
            return systemd.inherited_sockets()
        except systemd.ActivationError as error:
            raise DaemonError(str(error)) from None

    def start(self, service: Service) -> None:
        server = service.server
        self.signals = DeferredSignals(server)
        self.signals.on(signal.SIGHUP, lambda: self.reload_from_signal(service))
        if self.log_setup is not None:
            server.add_periodic(LOG_FLUSH_INTERVAL_S, self.log_setup.repeat_filter.flush_expired)
        if self.metrics_spec is not None:
            log_setup = self.log_setup
            peers = service.peers
            collector = GuardntpCollector(
                service.pipeline, server, self.reloads,
                (lambda: log_setup.suppressed_total) if log_setup is not None else None,
                peers=(lambda: peers.ask({"command": "snapshot"})) if peers else None)
            try:
                self.metrics = MetricsEndpoint(self.metrics_spec, make_registry(collector))
            except MetricsError as error:
                raise DaemonError(str(error)) from None
        if service.nts is not None:   # a port below 1024 for NTS-KE needs root too
            try:
                service.nts.start()
            except NtsError as error:
                raise DaemonError(str(error)) from None
        if self.identity is not None:
            try:
                chown_for(str(service.state_dir), self.identity)
                drop_privileges(self.identity)
            except OSError as error:
                raise DaemonError(f"state directory {service.state_dir}: {error.strerror}"
                                  ) from None
            except PrivilegeError as error:
                raise DaemonError(str(error)) from None
            log.info("running as user %s (uid %d, gid %d)", self.identity.user,
                     self.identity.uid, self.identity.gid)
        self.notify("READY=1")

    def reload_from_signal(self, service: Service) -> None:
        log.info("SIGHUP: reloading %s", service.config.path)
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        # A rejected reload has been logged and counted by Service.reload.
        with contextlib.suppress(ReloadRejected):
            service.reload()
        self.notify("READY=1")

    def reload_rejected(self) -> None:
        self.reloads["rejected"] += 1

    def reload_applied(self, old: Config, new: Config) -> None:
        """The parts of a reload that are ours: log settings now, restart hints for the rest."""
        self.reloads["ok"] += 1
        if self.log_setup is not None:
            self.log_setup.apply(LogSettings.from_section(new.extra.get("log", {})))
        if (new.server.user, new.server.group) != (old.server.user, old.server.group):
            log.warning("reload: server.user and server.group need a restart")
        if new.extra.get("metrics", {}).get("listen") != self.metrics_spec:
            log.warning("reload: metrics.listen needs a restart")

    def stop(self) -> None:
        self.notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.close()
        if self.signals is not None:
            self.signals.close()



def _no_notice(state: str) -> bool:
    return False
