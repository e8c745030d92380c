"""``guardntp check-config FILE``: validate a configuration without starting."""

from __future__ import annotations

import argparse

from ..auth.settings import check_auth_config
from ..cli import CommandError
from ..config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("check-config", help="validate a configuration file")
    parser.add_argument("file", nargs="?", help="TOML file (default: the embedded default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        auth = check_auth_config(config)  # [auth] and its key file
    except ConfigError as error:
        raise CommandError(str(error), 1) from None
    listen = ", ".join(str(spec) for spec in config.server.listen)
    print(f"{config.path}: OK (listen {listen}; clock {config.clock.source}; "
          f"{len(config.filter.acl)} access-list entries; {auth})")
    return 0
