"""``guardntp block add|remove|list|import|export``: edit the blocklist on disk.

A running server with the same state directory applies every change within a
second (``guardntp/blocklist/live.py``); nothing here talks to it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

from ..blocklist.entries import (
    ACTIONS,
    EXPORTERS,
    BadDuration,
    BadImportFile,
    BlockEntry,
    Network,
    describe_expiry,
    entry_json,
    format_table,
    parse_cidr,
    parse_duration,
    parse_import,
)
from ..blocklist.store import FILENAME, BlockStore, StoreError
from ..cli import CommandError, path_argument
from ..config import ConfigError, load_config, resolve_state_dir
from ..netaddr import BadAddress
from ..statedir import StateDirError, prepare_state_dir

#: An import with more bad lines than this lists the first ones and a count.
MAX_REPORTED_LINES = 50
#: An import file longer than this is refused unread (/dev/zero, a disk image): ten
#: million IPv4 /32s, one a line, are about 160 MiB.
MAX_IMPORT_BYTES = 256 << 20

#: The shortest prefix taken without ``--allow-wide``, by IP version. An IPv4 /8 is
#: the largest block ever given to one organisation; an IPv6 /16 is already wider
#: than almost any allocation (the RIRs themselves hold /12s). Anything wider is far
#: more likely a typo (``::/0``, ``0.0.0.0/0``) than a flood.
MIN_PREFIX = {4: 8, 6: 16}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_state_arguments(common)
    parser = subparsers.add_parser(
        "block", help="add, remove, list, import or export blocklist entries",
        description="Edit the blocklist in the state directory. A running server with "
        "the same state directory applies every change within a second.")
    actions = parser.add_subparsers(dest="block_command", metavar="ACTION", required=True,
                                    parser_class=type(parser))

    add = actions.add_parser("add", parents=[common], help="block a CIDR or address",
                             description="Block a CIDR (or one address). Adding a CIDR "
                             "that is already listed replaces its action, reason and TTL.")
    add.add_argument("cidr", metavar="CIDR", help="e.g. 192.0.2.0/24, 198.51.100.7, 2001:db8::/48")
    add_entry_options(add)
    add_wide_option(add)
    add.set_defaults(func=run_add)

    remove = actions.add_parser("remove", parents=[common], help="unblock a CIDR")
    remove.add_argument("cidr", metavar="CIDR", help="exactly as listed by `block list`")
    remove.set_defaults(func=run_remove)

    listing = actions.add_parser("list", parents=[common], help="show the blocklist")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--all", action="store_true",
                         help="include expired entries not yet purged")
    listing.set_defaults(func=run_list)

    importing = actions.add_parser(
        "import", parents=[common], help="block every CIDR in a file",
        description="Block every CIDR in FILE (one per line; # starts a comment). "
        "A file with any bad line is reported line by line and nothing is imported.")
    importing.add_argument("file", metavar="FILE", help="the list, or - for standard input")
    add_entry_options(importing)
    importing.add_argument("--replace", action="store_true",
                           help="first remove every earlier imported entry (same transaction)")
    add_wide_option(importing)
    importing.set_defaults(func=run_import)

    export = actions.add_parser(
        "export", parents=[common], help="print the blocklist for a firewall",
        description="Print the live entries as a plain list (re-importable), an "
        "nftables ruleset for `nft -f`, or an iptables + ipset script.")
    export.add_argument("--format", choices=sorted(EXPORTERS), default="plain")
    export.add_argument("--port", type=int, default=123,
                        help="the NTP port the firewall rules match (default 123)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="write FILE (atomically) instead of standard output")
    export.set_defaults(func=run_export)


def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", type=path_argument,
                        help="state directory (default: GUARDNTP_STATE_DIR, then the "
                        "configuration's server.state_dir, then /var/lib/guardntp)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="take server.state_dir from this configuration")


def add_entry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ttl", metavar="DURATION",
                        help="expire after e.g. 90s, 15m, 2h, 7d, 1w, 1h30m (default: never)")
    parser.add_argument("--reason", default=None, metavar="TEXT", help="why (shown in lists)")
    parser.add_argument("--action", choices=sorted(ACTIONS), default="drop",
                        help="drop silently (default) or send a DENY Kiss-o'-Death")


def add_wide_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-wide", action="store_true",
                        help=f"take networks wider than /{MIN_PREFIX[4]} (IPv4) or "
                        f"/{MIN_PREFIX[6]} (IPv6), such as 0.0.0.0/0 (refused without it)")


def state_dir_from(args: argparse.Namespace) -> Path:
    """``--state-dir``, else ``GUARDNTP_STATE_DIR``, else the configuration's, else the default."""
    if args.state_dir:
        return Path(args.state_dir).expanduser()
    configured = ""
    if args.config:
        try:
            configured = load_config(args.config).server.state_dir
        except ConfigError as error:
            raise CommandError(str(error), 2) from None
    return resolve_state_dir(configured)


def _open(state_dir: Path, create: bool = True) -> BlockStore:
    try:
        return BlockStore.in_state_dir(state_dir, create=create)
    except StoreError as error:
        raise CommandError(f"blocklist: {error}") from None


def _open_existing(state_dir: Path) -> BlockStore | None:
    """The store for a command that only reads or removes: None if the state directory
    has no blocklist yet. A missing directory is an error (a mistyped ``--state-dir``
    must not look like an empty blocklist), and nothing is created."""
    try:
        prepare_state_dir(state_dir, create=False)
    except StateDirError as error:
        raise CommandError(f"blocklist: {error}") from None
    try:
        # Not os.path.lexists: it says False for a file this user may not see, and a
        # blocklist it cannot read must not be listed as an empty one.
        os.lstat(state_dir / FILENAME)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CommandError(f"blocklist: {state_dir / FILENAME}: {error.strerror}") from None
    return _open(state_dir, create=False)


def _check_width(networks: list[Network], allow_wide: bool, what: str = "") -> None:
    """Refuse networks wider than :data:`MIN_PREFIX` unless allowed; warn when allowed."""
    wide = [n for n in networks if n.prefixlen < MIN_PREFIX[n.version]]
    if not wide:
        return
    shown = ", ".join(f"{n} ({_share(n)})" for n in wide[:3]) + (
        f" and {len(wide) - 3} more" if len(wide) > 3 else "")
    limits = f"/{MIN_PREFIX[4]} (IPv4) or /{MIN_PREFIX[6]} (IPv6)"
    if not allow_wide:
        raise CommandError(f"{what}{shown}: wider than {limits}; refused without "
                           "--allow-wide", 2)
    print(f"guardntp: warning: {what}blocking {shown}, wider than {limits}",
          file=sys.stderr)


def _share(network: Network) -> str:
    family = f"IPv{network.version}"
    return f"all of {family}" if network.prefixlen == 0 else \
        f"1/{2 ** network.prefixlen:,} of {family}"


def _ttl_ns(args: argparse.Namespace) -> int | None:
    if args.ttl is None:
        return None
    try:
        return parse_duration(args.ttl) * 1_000_000_000
    except BadDuration as error:
        raise CommandError(f"--ttl {error}", 2) from None


def _cidr(text: str) -> BlockEntry:
    try:
        return BlockEntry(parse_cidr(text))
    except BadAddress as error:
        raise CommandError(str(error), 2) from None


# ---------------------------------------------------------------------------- actions

def run_add(args: argparse.Namespace) -> int:
    network = _cidr(args.cidr).network
    ttl_ns = _ttl_ns(args)
    _check_width([network], args.allow_wide)
    now_ns = time.time_ns()
    entry = BlockEntry(network, args.action, _one_line(args.reason or ""), now_ns,
                       None if ttl_ns is None else now_ns + ttl_ns, "manual")
    store = _open(state_dir_from(args))
    try:
        added, _ = store.upsert([entry], now_ns)
    except StoreError as error:
        raise CommandError(f"blocklist: {error}") from None
    finally:
        store.close()
    print(f"{'blocked' if added else 'updated'} {entry.cidr}: {entry.action}, expires "
          f"{describe_expiry(entry, now_ns)}" + (f", reason: {entry.reason}" if entry.reason
                                                 else ""))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    network = _cidr(args.cidr).network
    state_dir = state_dir_from(args)
    store = _open_existing(state_dir)
    if store is None:
        raise CommandError(f"{network} is not in the blocklist (there is no blocklist in "
                           f"{state_dir} yet)")
    try:
        removed = store.remove(network, time.time_ns())
        listed = [] if removed else [e for e in store.entries()
                                     if network.overlaps(e.network)]
    except StoreError as error:
        raise CommandError(f"blocklist: {error}") from None
    finally:
        store.close()
    if not removed:
        hint = (" (overlapping entries: " + ", ".join(e.cidr for e in listed[:5]) + ")"
                if listed else "")
        raise CommandError(f"{network} is not in the blocklist{hint}")
    print(f"removed {network}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    now_ns = time.time_ns()
    entries = _entries(args)
    shown = [e for e in entries if args.all or e.active(now_ns)]
    if args.json:
        json.dump([entry_json(e, now_ns) for e in shown], sys.stdout, indent=2)
        print()
        return 0
    if not shown:
        print("the blocklist is empty" + ("" if len(entries) == len(shown) else
                                          f" ({len(entries)} expired; --all shows them)"))
        return 0
    sys.stdout.write(format_table(shown, now_ns))
    return 0


def run_import(args: argparse.Namespace) -> int:
    name = "<stdin>" if args.file == "-" else args.file
    if not name.strip():
        raise CommandError("the import file name is empty (- reads standard input)", 2)
    try:
        if args.file == "-":
            raw = sys.stdin.buffer.read(MAX_IMPORT_BYTES + 1)
        else:
            with open(args.file, "rb") as file:
                raw = file.read(MAX_IMPORT_BYTES + 1)
    except OSError as error:
        raise CommandError(f"{name}: cannot read: {error.strerror}") from None
    if len(raw) > MAX_IMPORT_BYTES:
        raise CommandError(f"{name}: larger than {MAX_IMPORT_BYTES >> 20} MiB; nothing "
                           "imported (split it)")
    try:
        networks = parse_import(raw.decode("utf-8", errors="replace"))
    except BadImportFile as error:
        for number, message in error.problems[:MAX_REPORTED_LINES]:
            print(f"{name}:{number}: {message}", file=sys.stderr)
        if len(error.problems) > MAX_REPORTED_LINES:
            print(f"{name}: ... and {len(error.problems) - MAX_REPORTED_LINES} more bad lines",
                  file=sys.stderr)
        raise CommandError(f"{name}: {len(error.problems)} bad line(s); nothing imported") \
            from None
    _check_width(networks, args.allow_wide, f"{name}: ")
    ttl_ns = _ttl_ns(args)
    now_ns = time.time_ns()
    reason = _one_line(args.reason if args.reason is not None else f"import {name}")
    expires_ns = None if ttl_ns is None else now_ns + ttl_ns
    entries = [BlockEntry(network, args.action, reason, now_ns, expires_ns, "import")
               for network in networks]
    store = _open(state_dir_from(args))
    try:
        added, updated = store.upsert(entries, now_ns,
                                      replace_origin="import" if args.replace else None)
    except StoreError as error:
        raise CommandError(f"blocklist: {error}; nothing imported") from None
    finally:
        store.close()
    print(f"imported {len(entries)} entries from {name}: {added} new, {updated} updated")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: must be 1-65535", 2)
    now_ns = time.time_ns()
    entries = sorted(_entries(args), key=lambda e: (e.network.version,
                                                    e.network.network_address,
                                                    e.network.prefixlen))
    exporter = EXPORTERS[args.format]
    text = exporter(entries, now_ns, args.port)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if not args.output.strip():
        raise CommandError("-o: the file name is empty (leave out -o for standard output)", 2)
    target = Path(args.output)
    try:
        info: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise CommandError(f"{target}: cannot write: {error.strerror}") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise CommandError(f"{target}: cannot write: Is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):
        # A FIFO, a terminal, /dev/stdout: written into, as `>` would. Renaming over
        # it would replace the device or the pipe itself with a plain file.
        try:
            with open(target, "w") as out:
                out.write(text)
        except OSError as error:
            raise CommandError(f"{target}: cannot write: {error.strerror}") from None
        return 0
    temporary_name = ""
    try:
        # A firewall reload must never read half a file: write aside, then rename.
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".guardntp-",
                                         delete=False) as temporary:
            temporary_name = temporary.name
            temporary.write(text)
        os.replace(temporary_name, target)
    except OSError as error:
        if temporary_name:
            with contextlib.suppress(OSError):
                os.unlink(temporary_name)
        raise CommandError(f"{target}: cannot write: {error.strerror}") from None
    return 0


def _entries(args: argparse.Namespace) -> list[BlockEntry]:
    store = _open_existing(state_dir_from(args))
    if store is None:
        return []
    try:
        return sorted(store.entries(), key=lambda e: (e.network.version,
                                                      e.network.network_address,
                                                      e.network.prefixlen))
    except StoreError as error:
        raise CommandError(f"blocklist: {error}") from None
    finally:
        store.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())
