"""``guardntp check-config FILE``: validate a configuration without starting.

It runs the checks a start or a reload runs (:func:`guardntp.daemon.settings.check_sections`),
so it accepts exactly the files a reload accepts; where NTS is on, that includes loading
its certificate and key, as a reload does.
"""

from __future__ import annotations

import argparse

from ..cli import CommandError
from ..config import ConfigError, load_config
from ..daemon.settings import check_sections


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("check-config", help="validate a configuration file")
    parser.add_argument("file", nargs="?", help="TOML file (default: the embedded default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        sections = check_sections(config)
    except ConfigError as error:
        raise CommandError(str(error), 1) from None
    cert, key = sections.nts.cert, sections.nts.key
    if cert is not None and key is not None:   # NTS on: load them, as a reload does
        from ..nts.ke_server import KeServerError, make_context

        try:
            make_context(cert, key)
        except KeServerError as error:
            raise CommandError(f"{config.path}: {error}", 1) from None
    listen = ", ".join(str(spec) for spec in config.server.listen)
    print(f"{config.path}: OK (listen {listen}; clock {config.clock.source}; "
          f"{len(config.filter.acl)} access-list entries; {sections.auth_summary})")
    return 0
