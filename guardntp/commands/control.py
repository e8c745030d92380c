"""``guardntp clients``, ``guardntp stats``, ``guardntp reload``: ask a running server.

They talk to the control socket in the server's state directory, so give them
the same ``--state-dir`` (or ``GUARDNTP_STATE_DIR``, or ``-c FILE``) as the server.

Output goes out in one write and flush; when the reader has gone (``| head``) the
command ends quietly with status 141 (128 + SIGPIPE, what a tool killed by the
signal reports, so ``set -o pipefail`` still sees that output was cut short).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import CLOSED_STDOUT, CommandError, discard_stdout
from ..control.channel import ControlError, request
from ..control.reports import SORT_KEYS, format_clients, format_stats
from .block import add_state_arguments, state_dir_from


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    clients = subparsers.add_parser(
        "clients", help="top talkers of a running server (like chronyc clients)",
        description="Sources the running server is tracking: IPv4 address or IPv6 prefix, "
        "fingerprint label (fast-poller when averaging under 15 s), requests, time replies, "
        "Kiss-o'-Death replies, drops, mean interval between requests, and when last seen.")
    add_state_arguments(clients)
    clients.add_argument("--sort", choices=list(SORT_KEYS), default="requests",
                         help="order (default requests; interval: fastest first)")
    clients.add_argument("-n", "--limit", type=int, default=20,
                         help="show this many (default 20; 0 = all)")
    clients.add_argument("--json", action="store_true", help="machine-readable output")
    clients.set_defaults(func=run_clients)

    stats = subparsers.add_parser(
        "stats", help="packet counters of a running server",
        description="Packets by verdict and reason, fingerprint labels, table sizes, "
        "evictions and blocklist state of the running server.")
    add_state_arguments(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=run_stats)

    reload = subparsers.add_parser(
        "reload", help="make a running server re-read its configuration",
        description="Re-read the configuration file and apply the filter settings and "
        "access lists, keeping every bucket. A bad file is reported and the running "
        "configuration stays in force.")
    add_state_arguments(reload)
    reload.set_defaults(func=run_reload)


def _ask(args: argparse.Namespace, message: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = request(state_dir_from(args), message)
    except ControlError as error:
        raise CommandError(str(error)) from None
    if not reply.get("ok"):
        raise CommandError(f"server: {reply.get('error', 'unknown error')}")
    return reply


#: The exit status when stdout's reader went away before all was written.


def emit(text: str) -> int:
    """Write ``text`` to stdout and flush: 0, or CLOSED_STDOUT if the reader has gone."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        return CLOSED_STDOUT
    return 0


def run_clients(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise CommandError("--limit must be 0 (all) or more", 2)
    reply = _ask(args, {"command": "clients", "sort": args.sort, "limit": args.limit})
    if args.json:
        return emit(json.dumps({"clients": reply["clients"], "total": reply["total"],
                                "truncated": reply["truncated"]}, indent=2) + "\n")
    rows = reply["clients"]
    if not rows:
        return emit("no clients yet\n")
    text = format_clients(rows)
    if reply["truncated"] or len(rows) < reply["total"]:
        text += (f"({len(rows)} of {reply['total']} sources"
                 + ("; the server sends at most 5000 rows" if reply["truncated"] else "")
                 + ")\n")
    return emit(text)


def run_stats(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "stats"})
    reply.pop("ok", None)
    return emit(json.dumps(reply, indent=2) + "\n" if args.json else format_stats(reply))


def run_reload(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "reload"})
    if not reply.get("reloaded"):
        raise CommandError(f"reload refused, the running configuration is kept: "
                           f"{reply.get('error')}")
    return emit(f"{reply.get('message', 'reloaded')}\n")
