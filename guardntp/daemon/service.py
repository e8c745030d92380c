"""A running server and everything around it: the one place features hook into.

Rule: the Service assembles the core (pipeline, responder, time source) and
the features (blocklist, control socket, metrics), handing each the narrow
things it uses. It never parses command-line arguments: it gets a checked
:class:`Config` and a ``load_config`` callable that re-reads the file with the
same overrides, for reloads.

Reload is all-or-nothing. :meth:`Service.reload` reads the file once, checks
every section (:func:`~guardntp.daemon.settings.check_sections`), loads the
keys and prepares the new filter policy; only when all of that succeeded is
anything swapped in. SIGHUP, ``guardntp reload`` and ``systemctl reload`` all
come here.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..auth.server import KeyAuthenticator
from ..auth.settings import authenticator_for
from ..blocklist.live import BlocklistError, LiveBlocklist, setup_blocklist
from ..config import Config, ConfigError
from ..control.channel import ControlError, ControlServer
from ..control.service import ControlCommands, setup_control
from ..filter.pipeline import Pipeline
from ..logs import LogSetup
from ..nts.settings import NtsError, NtsSettings
from ..responder import Responder
from ..server import ListenError, Server, open_socket
from ..statedir import StateDirError, prepare_state_dir
from ..systemd import describe_sockets
from ..timesources import make_source, measure_precision
from ..timesources.upstream import UpstreamClock
from .errors import DaemonError, ReloadRejected
from .operations import Operations
from .peers import PeerAnswerer, PeerLinks
from .settings import check_sections
from .steering import split_budgets

if TYPE_CHECKING:
    from ..nts.service import NtsService

log = logging.getLogger("guardntp")

ConfigLoader = Callable[[], Config]


class Service:
    """One server process: sockets, pipeline, time source and features.

    With ``--workers`` each worker is a Service (``workers`` says how many share
    the server-wide budgets). Worker 0 is given ``peers``, links to the others,
    and serves the control socket and metrics for all of them; the others are
    given ``peer_answerer_socket`` and answer worker 0's questions.
    """

    def __init__(self, config: Config, load_config: ConfigLoader, *,
                 key_file: str | None = None, log_setup: LogSetup | None = None,
                 sockets: list[socket.socket] | None = None, workers: int = 1,
                 on_control_reload: Callable[[], None] | None = None,
                 peers: PeerLinks | None = None,
                 peer_answerer_socket: socket.socket | None = None,
                 notify_systemd: bool = True, serve_nts_ke: bool = True) -> None:
        self.config = config
        self.load_config = load_config
        self.key_file = key_file
        #: Processes sharing the server-wide budgets (``--workers``; this is one of them).
        self.workers = workers
        self.on_control_reload = on_control_reload
        try:
            sections = check_sections(config)
        except ConfigError as error:
            raise DaemonError(str(error), 2) from None
        self.operations = Operations(config, log_setup, notify_systemd=notify_systemd)
        self.state_dir: Path = config.state_dir
        try:
            prepare_state_dir(self.state_dir)
        except StateDirError as error:
            raise DaemonError(f"{error} (use --state-dir or GUARDNTP_STATE_DIR)") from None
        precision = measure_precision()
        try:
            self.source = make_source(config.clock, precision)
        except ValueError as error:
            raise DaemonError(str(error), 2) from None
        try:  # keys before sockets: a bad key file fails fast, before binding port 123
            self.authenticator: KeyAuthenticator | None = authenticator_for(config, key_file)
        except ConfigError as error:
            raise DaemonError(str(error), 2) from None
        try:
            self.sockets = sockets if sockets is not None else (
                self.operations.inherited_sockets()
                or [open_socket(spec) for spec in config.server.listen])
        except ListenError as error:
            raise DaemonError(str(error)) from None
        now = time.time_ns()
        self.pipeline = Pipeline(split_budgets(config.filter, workers),
                                 Responder(self.source.state(now), now),
                                 authenticator=self.authenticator)
        self.server = Server(self.sockets, self.pipeline, self.source)
        owner = self.operations.future_owner()
        try:
            self.blocklist: LiveBlocklist = setup_blocklist(
                self.state_dir, self.pipeline, self.server, sections.auto_blocking, owner)
        except BlocklistError as error:
            raise DaemonError(str(error)) from None
        self.nts: NtsService | None = None
        if sections.nts.enabled:
            try:
                # The certificate is read here, while still root if started as root.
                self.nts = start_nts(sections.nts, self.state_dir,
                                     config.server.listen[0].port, serve_nts_ke)
                if owner is not None:
                    self.nts.hand_over(*owner)
            except NtsError as error:
                self.close_features()
                raise DaemonError(str(error)) from None
            self.server.add_periodic(self.nts.KEY_REFRESH_S, self.nts.refresh)
            self.pipeline.nts = self.nts
        self.peers = peers
        self.commands = ControlCommands(
            self.pipeline, self.server, self.blocklist, self.reload_from_control, peers,
            self.source if isinstance(self.source, UpstreamClock) else None,
            self.nts.report if self.nts is not None else None)
        self.control: ControlServer | None = None
        if sections.control_enabled:
            try:
                self.control = setup_control(self.state_dir, self.commands, self.server, owner)
            except ControlError as error:
                self.close_features()
                raise DaemonError(str(error)) from None
        self.peer_answerer: PeerAnswerer | None = None
        if peer_answerer_socket is not None:
            self.peer_answerer = PeerAnswerer(peer_answerer_socket, self.commands,
                                              self.server)

    # ------------------------------------------------------------------ reload

    def reload(self) -> str:
        """Re-read the configuration and apply it whole, or nothing of it.

        Returns the one-line summary (also logged). Raises :class:`ReloadRejected`
        with the one-line reason (also logged, and counted in the metrics).
        """
        try:
            new = self.load_config()
            sections = check_sections(new)
            # Keys are re-read too (a rotated key file takes effect); a bad one keeps the old.
            authenticator = authenticator_for(new, self.key_file)
            apply_nts = self._prepare_nts_reload(sections.nts)
            self.pipeline.apply_policy(split_budgets(new.filter, self.workers))
        except (ConfigError, ValueError, NtsError) as error:
            self.operations.reload_rejected()
            log.error("reload rejected, keeping the running configuration: %s", error)
            raise ReloadRejected(str(error)) from None
        # The policy is in; what follows only assigns checked values.
        self.authenticator = self.pipeline.authenticator = authenticator
        if apply_nts is not None:
            apply_nts()
        self.blocklist.set_auto_policy(sections.auto_blocking)
        if new.server.listen != self.config.server.listen or new.clock != self.config.clock:
            log.warning("reload: listen addresses and clock settings need a restart; "
                        "applying the filter settings only")
        if sections.control_enabled != (self.control is not None):
            log.warning("reload: control.enabled needs a restart")
        self.operations.reload_applied(self.config, new)
        self.config = replace(self.config, filter=new.filter, extra=new.extra)
        message = (f"reloaded {new.path}: {len(new.filter.acl)} access-list entries, "
                   f"source rate {new.filter.source_rate}/s burst {new.filter.source_burst}")
        log.info("%s", message)
        return message

    def _prepare_nts_reload(self, settings: NtsSettings) -> Callable[[], None] | None:
        if self.nts is not None:
            return self.nts.prepare_reload(settings)
        if settings.enabled:
            log.warning("reload: turning NTS on needs a restart")
        return None

    def reload_from_control(self) -> str:
        """``guardntp reload``: as :meth:`reload`, then the other workers are told."""
        message = self.reload()
        if self.on_control_reload is not None:
            self.on_control_reload()
        return message

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        self.server.install_signal_handlers()
        self.operations.start(self)  # SIGHUP, metrics, privilege drop, READY=1
        log.info("guardntp %s serving %s with the %s clock (pid %d, state in %s)",
                 __version__, describe_sockets(self.sockets),
                 self.source.name, os.getpid(), self.state_dir)
        try:
            self.server.run()
        finally:
            self.operations.stop()
            if self.control is not None:
                self.control.close()
            if self.peer_answerer is not None:
                self.peer_answerer.close()
            self.close_features()
            for sock in self.sockets:
                sock.close()
            if self.workers == 1:  # with workers, the parent logs the server's total
                log.info("stopped: %s", describe_totals(self.totals()))
        return 0

    def close_features(self) -> None:
        """Stop what the features started (the NTS-KE thread, the blocklist store)."""
        if self.nts is not None:
            self.nts.stop()
        self.blocklist.close()

    def totals(self) -> dict[str, int]:
        """Packets decided so far, by verdict, and ``"packets"`` for all of them."""
        counters = self.pipeline.counters
        return {"packets": counters.total(), **counters.by_verdict()}


def start_nts(settings: NtsSettings, state_dir: Path, ntp_port: int,
              serve_ke: bool) -> NtsService:
    """The NTS service; raises NtsError, also when the ``nts`` extra is not installed
    (a server without NTS never imports cryptography or pyOpenSSL)."""
    try:
        from ..nts.service import NtsService
    except ImportError as error:
        raise NtsError(f"NTS needs the 'nts' extra ({error.name} is missing): "
                       "pip install 'guardntp[nts]'") from None
    return NtsService(settings, state_dir, ntp_port, serve_ke=serve_ke)


def describe_totals(totals: dict[str, int]) -> str:
    """``1234 packets (answered 1200, kod 4, dropped 30)`` for the shutdown line."""
    verdicts = ", ".join(f"{k} {v}" for k, v in totals.items() if k != "packets")
    return f"{totals.get('packets', 0)} packets ({verdicts})"
