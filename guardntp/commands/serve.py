"""``guardntp serve``: run the server."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from dataclasses import replace

from .. import operations
from ..auth.settings import authenticator_for
from ..blocklist.live import setup_blocklist
from ..cli import CommandError
from ..config import Config, ConfigError, apply_overrides, load_config
from ..control.service import setup_control
from ..filter.pipeline import Pipeline
from ..logs import LogSetup
from ..netaddr import BadAddress, parse_listen
from ..responder import Responder
from ..server import ListenError, Server, open_socket
from ..systemd import describe_sockets
from ..timesources import make_source, measure_precision
from ..workers import serve_workers, split_budgets

log = logging.getLogger("guardntp")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="run the NTP server",
                                   description="Run the NTP server. Without --config the "
                                   "embedded default serves the local clock on 127.0.0.1:12300.")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="TOML configuration (default: the embedded lab default)")
    parser.add_argument("--listen", action="append", metavar="HOST[:PORT]",
                        help="address to serve on, repeatable; port 123 when omitted")
    parser.add_argument("--clock", choices=("system", "upstream", "local"),
                        help="time source (overrides clock.source)")
    parser.add_argument("--stratum", type=int, help="stratum for --clock local / system")
    parser.add_argument("--upstream", action="append", metavar="HOST[:PORT]",
                        help="upstream server for --clock upstream, repeatable")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (also GUARDNTP_STATE_DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any configuration key, e.g. filter.source_rate=1.0")
    parser.add_argument("--key-file", metavar="FILE",
                        help="symmetric keys in chrony's format (overrides auth.key_file)")
    parser.add_argument("--user", metavar="USER",
                        help="drop to this user after binding (overrides server.user)")
    parser.add_argument("--group", metavar="GROUP",
                        help="and this group (default: the user's own; server.group)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics here, e.g. 127.0.0.1:9976; "
                        "'off' for none (overrides metrics.listen)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="log line format (overrides log.format)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="least severe level logged (overrides log.level and -v)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes sharing the port, requests steered by source "
                        "prefix (overrides server.workers; docs/benchmarks.md)")


def build_config(args: argparse.Namespace) -> Config:
    """The file (or embedded default), then --set, then the named flags. Raises CommandError."""
    try:
        config = apply_overrides(load_config(args.config), args.set)
        server, clock = config.server, config.clock
        if args.listen:
            server = replace(server, listen=tuple(parse_listen(text) for text in args.listen))
        if args.clock:
            clock = replace(clock, source=args.clock)
        if args.stratum is not None:
            if not 1 <= args.stratum <= 15:
                raise ConfigError(f"--stratum {args.stratum}: must be 1-15")
            clock = replace(clock, stratum=args.stratum)
        if args.upstream:
            clock = replace(clock, upstreams=tuple(args.upstream))
        workers = getattr(args, "workers", None)
        if workers is not None:
            if not 1 <= workers <= 64:
                raise ConfigError(f"--workers {workers}: must be 1-64")
            server = replace(server, workers=workers)
        server, extra = operations.apply_flags(args, server, config.extra)
        return replace(config, server=server, clock=clock, extra=extra,
                       state_dir_flag=args.state_dir or "")
    except (ConfigError, BadAddress) as error:
        raise CommandError(str(error), 2) from None


class Service:
    """A running server and everything around it: the one place features hook into.

    ``reload()`` re-reads the configuration file and applies filter settings and
    access lists without touching sockets or bucket state (SIGHUP and
    ``guardntp reload`` both call it). Features (control socket, blocklist,
    metrics) register readers and timers on ``self.server``.
    """

    def __init__(self, args: argparse.Namespace, config: Config,
                 log_setup: LogSetup | None = None,
                 sockets: list[socket.socket] | None = None, workers: int = 1) -> None:
        self.args = args
        self.config = config
        #: Processes sharing the server-wide budgets (``--workers``; this is one of them).
        self.workers = workers
        self.operations = operations.Operations(config, log_setup)
        self.state_dir = config.state_dir
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as error:
            raise CommandError(f"state directory {self.state_dir}: {error.strerror} "
                               "(use --state-dir or GUARDNTP_STATE_DIR)") from None
        precision = measure_precision()
        try:
            self.source = make_source(config.clock, precision)
        except ValueError as error:
            raise CommandError(str(error), 2) from None
        try:  # keys before sockets: a bad key file fails fast, before binding port 123
            self.authenticator = authenticator_for(config, getattr(args, "key_file", None))
        except ConfigError as error:
            raise CommandError(str(error), 2) from None
        try:
            self.sockets = sockets if sockets is not None else (
                self.operations.inherited_sockets()
                or [open_socket(spec) for spec in config.server.listen])
        except ListenError as error:
            raise CommandError(str(error)) from None
        now = time.time_ns()
        self.pipeline = Pipeline(split_budgets(config.filter, workers),
                                 Responder(self.source.state(now), now),
                                 authenticator=self.authenticator)
        self.server = Server(self.sockets, self.pipeline, self.source)
        self.blocklist = setup_blocklist(self)  # the store's entries, live; auto blocks
        self.control = setup_control(self)      # clients, stats, reload over a Unix socket

    def reload(self) -> str:
        """Re-read the configuration; raises ConfigError (the running one is kept)."""
        try:
            new = build_config(self.args)
        except CommandError as error:
            self.operations.reload_rejected()
            raise ConfigError(str(error)) from None
        # Keys are re-read too (a rotated key file takes effect); a bad one keeps the old.
        authenticator = authenticator_for(new, getattr(self.args, "key_file", None))
        if new.server.listen != self.config.server.listen or new.clock != self.config.clock:
            log.warning("reload: listen addresses and clock settings need a restart; "
                        "applying the filter settings only")
        self.pipeline.apply_policy(split_budgets(new.filter, self.workers))
        self.authenticator = self.pipeline.authenticator = authenticator
        self.operations.reload_applied(self.config, new)
        self.config = replace(self.config, filter=new.filter, extra=new.extra)
        message = (f"reloaded {new.path}: {len(new.filter.acl)} access-list entries, "
                   f"source rate {new.filter.source_rate}/s burst {new.filter.source_burst}")
        log.info("%s", message)
        return message

    def run(self) -> int:
        self.server.install_signal_handlers()
        self.operations.start(self)  # SIGHUP, metrics, privilege drop, READY=1
        log.info("guardntp %s serving %s with the %s clock (pid %d, state in %s)",
                 _version(), describe_sockets(self.sockets),
                 self.source.name, os.getpid(), self.state_dir)
        try:
            self.server.run()
        finally:
            self.operations.stop()
            if self.control is not None:
                self.control.close()
            self.blocklist.close()
            for sock in self.sockets:
                sock.close()
            totals = self.pipeline.counters.by_verdict()
            log.info("stopped: %d packets (%s)", self.pipeline.counters.total(),
                     ", ".join(f"{k} {v}" for k, v in totals.items()))
        return 0


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    log_setup = operations.install_logging(args, config)
    try:
        if config.server.workers > 1:
            return serve_workers(args, config, log_setup)
        return Service(args, config, log_setup).run()
    finally:
        log_setup.uninstall()


def _version() -> str:
    from .. import __version__

    return __version__
