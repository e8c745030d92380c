"""``guardntp`` command line: one sub-command per module in ``guardntp/commands``.

Rule: ``main(argv) -> int`` never lets a traceback reach the user for bad input:
each command raises :class:`CommandError` (or a known error type) with a one-line
message, printed as ``guardntp: ...`` with exit status 2 (usage) or 1 (failure).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from . import __version__

#: Sub-command modules, each with ``register(subparsers)`` setting ``func``.
COMMAND_MODULES = (
    "serve",
    "query",
    "check_config",
    "block",
    "control",
    "capture",
    "replay",
)


#: Exit status when stdout's reader went away (``guardntp stats | head -1``): 128 + SIGPIPE,
#: as git and coreutils do, so ``set -o pipefail`` still sees the output was cut short.
CLOSED_STDOUT = 141
#: Write errors that say the output's disk (or device) failed, never a bug.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class CommandError(Exception):
    """A command failed in a way the user can fix; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def path_argument(text: str) -> str:
    """A file or directory argument: an empty one (``--state-dir "$UNSET"``) is refused,
    not read as "not given", which would send the command to the default place."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise CommandError(f"{self.prog}: {message}", 2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guardntp", description="An abuse-resistant public NTP server.")
    parser.add_argument("--version", action="version", version=f"guardntp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"guardntp.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose or
            args.command == "serve" else logging.WARNING,
            format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
        status: int = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        discard_stdout()
        return CLOSED_STDOUT
    except OSError as error:
        # Output that cannot be written (``guardntp stats > /dev/full``, a full disk): the
        # commands catch the errors of the files they open, so this is standard output.
        if error.errno not in OUTPUT_ERRNOS:
            raise
        discard_stdout()
        where = error.filename if error.filename is not None else "cannot write the output"
        print(f"guardntp: {where}: {error.strerror}", file=sys.stderr)
        return 1
    except CommandError as error:
        print(f"guardntp: {error}" if not str(error).startswith("guardntp") else str(error),
              file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return 130


def discard_stdout() -> None:
    # Python flushes stdout once more at exit and would report that failure too;
    # pointed at /dev/null, what is still buffered goes nowhere, quietly.
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
