"""What ``guardntp serve`` does around the packet loop for the operator.

Rule: this is the edge that ties the operations features to the ``Service``:
the command-line flags that override ``[server] user/group``, ``[metrics]`` and
``[log]``; sockets from systemd; SIGHUP -> ``Service.reload()`` run from the
loop; the metrics endpoint; the privilege drop; readiness notices to systemd.

Order at start (``Operations.start``): everything that may need root is done
first (sockets were bound by the Service; the metrics port is bound here),
then privileges are dropped, then systemd hears READY=1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import systemd
from .cli import CommandError
from .config import Config, ConfigError, ServerConfig
from .logs import LogSettings, LogSetup
from .metrics import (
    GuardntpCollector,
    MetricsEndpoint,
    MetricsError,
    make_registry,
    require_prometheus,
)
from .netaddr import parse_listen
from .privileges import Identity, PrivilegeError, chown_for, drop_privileges, resolve_identity
from .signals import DeferredSignals

if TYPE_CHECKING:
    from .commands.serve import Service

log = logging.getLogger("guardntp")

#: How often windows of the log repeat limit are closed and their summaries written.
LOG_FLUSH_INTERVAL_S = 5.0


def apply_flags(args: argparse.Namespace, server: ServerConfig,
                extra: dict[str, dict[str, Any]]) -> tuple[ServerConfig, dict[str, dict[str, Any]]]:
    """``--user --group --metrics --log-format --log-level`` over the file's values.

    Raises ConfigError or BadAddress (``build_config`` turns both into one-line errors).
    """
    if getattr(args, "user", None):
        server = replace(server, user=args.user)
    if getattr(args, "group", None):
        server = replace(server, group=args.group)
    metrics = dict(extra.get("metrics", {}))
    flag = getattr(args, "metrics", None)
    if flag is not None:
        if flag.strip().lower() in ("", "off", "none"):
            metrics["listen"] = None
        else:
            spec = parse_listen(flag, default_port=0)
            if spec.port == 0:
                raise ConfigError(f"--metrics {flag}: needs a port, e.g. 127.0.0.1:9976")
            metrics["listen"] = spec
    log_section = dict(extra.get("log", {}))
    if getattr(args, "log_format", None):
        log_section["format"] = args.log_format
    if getattr(args, "log_level", None):
        log_section["level"] = args.log_level
    return server, {**extra, "metrics": metrics, "log": log_section}


def install_logging(args: argparse.Namespace, config: Config) -> LogSetup:
    """Replace the CLI's plain stderr handler with the configured, rate-limited one."""
    verbose = getattr(args, "verbose", 0)
    explicit_level = getattr(args, "log_level", None)
    override = None if explicit_level else "debug" if verbose > 1 else "info" if verbose else None
    settings = LogSettings.from_section(config.extra.get("log", {}))
    return LogSetup(settings, level_override=override).install()


class Operations:
    """Created by ``Service.__init__``; :meth:`start` runs just before the loop."""

    def __init__(self, config: Config, log_setup: LogSetup | None = None) -> None:
        self.log_setup = log_setup
        self.reloads = {"ok": 0, "rejected": 0}
        self.metrics: MetricsEndpoint | None = None
        self.signals: DeferredSignals | None = None
        self.identity: Identity | None = None
        self.metrics_spec = config.extra.get("metrics", {}).get("listen")
        if config.server.user:
            try:
                self.identity = resolve_identity(config.server.user, config.server.group)
            except PrivilegeError as error:
                raise CommandError(str(error), 2) from None
        elif config.server.group:
            raise CommandError("--group needs --user (server.group needs server.user)", 2)
        if self.metrics_spec is not None:
            try:
                require_prometheus()  # fail before binding anything, not after
            except MetricsError as error:
                raise CommandError(str(error)) from None

    def inherited_sockets(self) -> list[socket.socket]:
        """Sockets from systemd socket activation (empty if not socket-activated)."""
        try:
            return systemd.inherited_sockets()
        except systemd.ActivationError as error:
            raise CommandError(str(error)) from None

    def start(self, service: Service) -> None:
        server = service.server
        self.signals = DeferredSignals(server)
        self.signals.on(signal.SIGHUP, lambda: self.reload_from_signal(service))
        if self.log_setup is not None:
            server.add_periodic(LOG_FLUSH_INTERVAL_S, self.log_setup.repeat_filter.flush_expired)
        if self.metrics_spec is not None:
            log_setup = self.log_setup
            collector = GuardntpCollector(
                service.pipeline, server, self.reloads,
                (lambda: log_setup.suppressed_total) if log_setup is not None else None)
            try:
                self.metrics = MetricsEndpoint(self.metrics_spec, make_registry(collector))
            except MetricsError as error:
                raise CommandError(str(error)) from None
        if self.identity is not None:
            try:
                chown_for(str(service.state_dir), self.identity)
                drop_privileges(self.identity)
            except OSError as error:
                raise CommandError(f"state directory {service.state_dir}: {error.strerror}"
                                   ) from None
            except PrivilegeError as error:
                raise CommandError(str(error)) from None
            log.info("running as user %s (uid %d, gid %d)", self.identity.user,
                     self.identity.uid, self.identity.gid)
        systemd.notify("READY=1")

    def reload_from_signal(self, service: Service) -> None:
        log.info("SIGHUP: reloading %s", service.config.path)
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            service.reload()
        except ConfigError as error:
            log.error("reload rejected, keeping the running configuration: %s", error)
        finally:
            systemd.notify("READY=1")

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
        systemd.notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.close()
        if self.signals is not None:
            self.signals.close()

