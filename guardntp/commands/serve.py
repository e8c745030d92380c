"""``guardntp serve``: run the server."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

from ..cli import CommandError, path_argument
from ..config import Config, ConfigError, ServerConfig, apply_overrides, load_config
from ..daemon.errors import DaemonError
from ..daemon.service import Service
from ..daemon.workers import serve_workers
from ..logs import LogSettings, LogSetup
from ..netaddr import BadAddress, parse_host_port, parse_listen


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
    parser.add_argument("--state-dir", metavar="DIR", type=path_argument,
                        help="state directory (also GUARDNTP_STATE_DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any configuration key, e.g. filter.source_rate=1.0")
    parser.add_argument("--key-file", metavar="FILE", type=path_argument,
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
    parser.add_argument("--nts-cert", metavar="FILE", type=path_argument,
                        help="serve NTS (RFC 8915) with this PEM certificate chain "
                        "(overrides nts.cert; docs/nts.md)")
    parser.add_argument("--nts-key", metavar="FILE", type=path_argument,
                        help="the certificate's private key (overrides nts.key)")
    parser.add_argument("--nts-ke-listen", metavar="HOST[:PORT]",
                        help="NTS-KE address, port 4460 when omitted (overrides nts.ke_listen)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes sharing the port, requests steered by source "
                        "prefix (overrides server.workers; docs/benchmarks.md)")


def build_config(args: argparse.Namespace) -> Config:
    """The file (or embedded default), then --set, then the named flags.

    Raises ConfigError (one line); a reload calls this again with the same arguments.
    """
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
            for text in args.upstream:
                try:
                    parse_host_port(text)
                except BadAddress as error:
                    raise ConfigError(f"--upstream {error}") from None
            clock = replace(clock, upstreams=tuple(args.upstream))
        workers = getattr(args, "workers", None)
        if workers is not None:
            if not 1 <= workers <= 64:
                raise ConfigError(f"--workers {workers}: must be 1-64")
            server = replace(server, workers=workers)
        server, extra = apply_flags(args, server, config.extra)
        return replace(config, server=server, clock=clock, extra=extra,
                       state_dir_flag=args.state_dir or "")
    except BadAddress as error:
        raise ConfigError(str(error)) from None


def apply_flags(args: argparse.Namespace, server: ServerConfig,
                extra: dict[str, dict[str, Any]]) -> tuple[ServerConfig, dict[str, dict[str, Any]]]:
    """``--user --group --metrics --nts-* --log-format --log-level`` over the file's values.

    Raises ConfigError or BadAddress (``build_config`` turns the latter into the former).
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
    nts = dict(extra.get("nts", {}))
    for flag_name, key in (("nts_cert", "cert"), ("nts_key", "key")):
        value = getattr(args, flag_name, None)
        if value:   # relative to where the command runs, as any path on a command line
            nts[key] = os.path.abspath(value)
    if getattr(args, "nts_ke_listen", None):
        nts["ke_listen"] = args.nts_ke_listen
    if nts:
        extra = {**extra, "nts": nts}
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


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as error:
        raise CommandError(str(error), 2) from None
    log_setup = install_logging(args, config)
    key_file = getattr(args, "key_file", None)

    def reread() -> Config:
        return build_config(args)

    try:
        if config.server.workers > 1:
            return serve_workers(config, reread, key_file, log_setup)
        return Service(config, reread, key_file=key_file, log_setup=log_setup).run()
    except DaemonError as error:
        raise CommandError(str(error), error.status) from None
    finally:
        log_setup.uninstall()
