"""Blocklist entries as values: parsing, durations, import files, and exports.

Rule: pure. Nothing here opens a file or reads a clock; every time comes in as
``now_ns`` (wall-clock Unix nanoseconds) and every text comes in as a string.
``store.py`` keeps these entries in SQLite; ``live.py`` feeds them to the filter.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ..filter.acl import AclEntry, Action, parse_network
from ..netaddr import BadAddress
from ..timestamps import NS_PER_S

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Where an entry came from: typed by an operator, read from a file, or added by
#: the server itself (``[blocklist] auto``).
ORIGINS = ("manual", "import", "auto")
#: ``drop`` = silent; ``deny`` = a DENY Kiss-o'-Death (rate limited like every KoD), then drop.
ACTIONS = {"drop": Action.DROP, "deny": Action.DENY}

#: A TTL longer than this is almost certainly a typo (``--ttl 5000d``); "never" is no --ttl.
MAX_TTL_S = 10 * 365 * 86_400
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(\d+)([smhdw])")


class BadDuration(ValueError):
    """A duration such as ``5x`` or ``0s`` that cannot be a TTL; the message says why."""


class BadImportFile(ValueError):
    """An import file with bad lines; ``problems`` holds ``(line number, message)``."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__(f"{len(problems)} bad line(s)")
        self.problems = problems


@dataclass(frozen=True, slots=True)
class BlockEntry:
    network: Network
    action: str = "drop"             # a key of ACTIONS
    reason: str = ""
    created_ns: int = 0              # wall-clock Unix ns
    expires_ns: int | None = None    # wall-clock Unix ns; None = never
    origin: str = "manual"           # one of ORIGINS

    @property
    def cidr(self) -> str:
        return str(self.network)

    def active(self, now_ns: int) -> bool:
        return self.expires_ns is None or now_ns < self.expires_ns

    def remaining_s(self, now_ns: int) -> int | None:
        """Whole seconds left (rounded up, so a live entry never shows 0); None = never."""
        if self.expires_ns is None:
            return None
        return max(0, -((now_ns - self.expires_ns) // NS_PER_S))

    def acl_entry(self) -> AclEntry:
        return AclEntry(self.network, ACTIONS[self.action], self.origin, self.reason,
                        self.expires_ns)


# ---------------------------------------------------------------------------- parsing

def parse_cidr(text: str) -> Network:
    """A CIDR or bare address; host bits past the prefix are an error. Raises BadAddress."""
    if not text.strip():
        raise BadAddress("an empty address is not a CIDR")
    return parse_network(text, strict=True)


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` or sums like ``1h30m`` -> seconds."""
    cleaned = text.strip().lower()
    if cleaned.isdigit():
        seconds = int(cleaned)
    else:
        parts = _DURATION.findall(cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise BadDuration(f"{text!r} is not a duration (use e.g. 90s, 15m, 2h, 7d, 1w "
                              "or 1h30m; a bare number is seconds)")
        seconds = sum(int(number) * _UNIT_S[unit] for number, unit in parts)
    if seconds <= 0:
        raise BadDuration(f"{text!r}: a TTL must be longer than zero (omit --ttl for 'never')")
    if seconds > MAX_TTL_S:
        raise BadDuration(f"{text!r}: longer than 10 years (omit --ttl for 'never')")
    return seconds


def format_duration(seconds: int) -> str:
    """Seconds -> the two largest units, e.g. ``1h30m``, ``59m59s``, ``7d``."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])


def parse_import(text: str) -> list[Network]:
    """One CIDR per line; ``#`` starts a comment; blank lines are skipped.

    Returns the networks in file order without duplicates, or raises
    :class:`BadImportFile` listing every bad line: a file is taken whole or not at all.
    """
    networks: dict[Network, None] = {}
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        if len(content.split()) > 1:
            shown = repr(content) if len(content) <= 60 else repr(content[:40]) + "..."
            problems.append((number, f"{shown}: one CIDR per line "
                                     "(put anything else after a #)"))
            continue
        try:
            networks[parse_cidr(content)] = None
        except BadAddress as error:
            problems.append((number, str(error)))
    if problems:
        raise BadImportFile(problems)
    return list(networks)


# ---------------------------------------------------------------------------- text forms

def iso_utc(unix_ns: int) -> str:
    return datetime.fromtimestamp(unix_ns // NS_PER_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def entry_json(entry: BlockEntry, now_ns: int) -> dict[str, object]:
    return {
        "cidr": entry.cidr, "action": entry.action, "origin": entry.origin,
        "reason": entry.reason,
        "created": iso_utc(entry.created_ns), "created_ns": entry.created_ns,
        "expires": None if entry.expires_ns is None else iso_utc(entry.expires_ns),
        "expires_ns": entry.expires_ns, "remaining_s": entry.remaining_s(now_ns),
        "active": entry.active(now_ns),
    }


def describe_expiry(entry: BlockEntry, now_ns: int) -> str:
    remaining = entry.remaining_s(now_ns)
    if remaining is None:
        return "never"
    if not entry.active(now_ns):
        return "expired"
    return f"in {format_duration(remaining)}"


def format_table(entries: list[BlockEntry], now_ns: int) -> str:
    """The human ``block list``: aligned columns, one entry per line."""
    header = ("CIDR", "ACTION", "ORIGIN", "EXPIRES", "CREATED", "REASON")
    rows = [header] + [
        (e.cidr, e.action, e.origin, describe_expiry(e, now_ns), iso_utc(e.created_ns),
         e.reason) for e in entries]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "".join(
        ("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
         + "  " + row[-1]).rstrip() + "\n" for row in rows)


# ---------------------------------------------------------------------------- exports

NFT_TABLE = "guardntp"


def export_plain(entries: list[BlockEntry], now_ns: int, port: int = 123) -> str:
    """One CIDR per line with a trailing comment: ``guardntp block import`` reads it back.
    (``port`` is for the firewall formats; a plain list has no rules to put it in.)"""
    live = _live(entries, now_ns)
    lines = [f"# guardntp blocklist, {iso_utc(now_ns)}: {len(live)} entries"]
    for entry in live:
        note = f"{entry.action}, {entry.origin}, expires {describe_expiry(entry, now_ns)}"
        if entry.reason:
            note += f": {_one_line(entry.reason)}"
        lines.append(f"{entry.cidr}  # {note}")
    return "\n".join(lines) + "\n"


def export_nft(entries: list[BlockEntry], now_ns: int, port: int = 123) -> str:
    """An ``nft -f`` ruleset: an ``inet`` table whose sets drop NTP from the listed sources.

    The table is deleted and re-created in the same atomic ``nft -f`` transaction, so
    loading a newer export replaces the old one without a moment of no rules. The
    hook is ``prerouting`` at priority ``raw``: a flood is dropped before conntrack
    and routing spend anything on it. Entries with an expiry carry an nft
    ``timeout``, so the kernel lets them lapse on its own. DENY entries are dropped
    too: a firewall cannot send a Kiss-o'-Death.
    """
    live = _live(entries, now_ns)
    lines = [
        "#!/usr/sbin/nft -f",
        f"# guardntp blocklist, {iso_utc(now_ns)}: {len(live)} entries (DENY entries drop here).",
        f"# Load with: nft -f FILE   Remove with: nft delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
    ]
    rules = []
    for version, kind, match in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
        levels = nesting_levels([e for e in live if e.network.version == version])
        for depth, level in enumerate(levels or [[]]):
            name = f"blocklist_v{version}" + (f"_nested{depth}" if depth else "")
            lines += [f"\tset {name} {{", f"\t\ttype {kind}", "\t\tflags interval, timeout"]
            if level:
                elements = ", ".join(_nft_element(e, now_ns) for e in level)
                lines.append(f"\t\telements = {{ {elements} }}")
            lines.append("\t}")
            rules.append(f"\t\t{match} saddr @{name} udp dport {port} counter drop")
    lines += ["\tchain prerouting {",
              "\t\ttype filter hook prerouting priority raw; policy accept;",
              *rules, "\t}", "}"]
    return "\n".join(lines) + "\n"


def export_iptables(entries: list[BlockEntry], now_ns: int, port: int = 123) -> str:
    """A shell script for iptables with ipset (``hash:net`` sets have per-element timeouts)."""
    live = _live(entries, now_ns)
    lines = ["#!/bin/sh",
             f"# guardntp blocklist, {iso_utc(now_ns)}: {len(live)} entries (DENY entries drop "
             "here). Needs ipset.", "set -e"]
    for version, family, tool in ((4, "inet", "iptables"), (6, "inet6", "ip6tables")):
        name = f"guardntp-v{version}"
        lines += [f"ipset create {name} hash:net family {family} timeout 0 -exist",
                  f"ipset flush {name}"]
        for entry in live:
            if entry.network.version == version:
                remaining = entry.remaining_s(now_ns)
                lines.append(f"ipset add {name} {entry.cidr} timeout {remaining or 0} -exist")
        rule = f"INPUT -p udp --dport {port} -m set --match-set {name} src -j DROP"
        lines.append(f"{tool} -C {rule} 2>/dev/null || {tool} -I {rule}")
    return "\n".join(lines) + "\n"


EXPORTERS = {"plain": export_plain, "nft": export_nft, "iptables": export_iptables}


def nesting_levels(entries: list[BlockEntry]) -> list[list[BlockEntry]]:
    """Split entries of one family into levels with no overlap inside a level.

    An nft interval set refuses overlapping elements ("conflicting intervals"), yet
    an operator may block 10.1.0.0/16 today and 10.0.0.0/8 tomorrow. CIDRs either
    nest or are disjoint, so putting each entry at its nesting depth (how many
    other entries contain it) gives levels whose members are pairwise disjoint.
    An entry inside one that lasts at least as long adds nothing and is left out.
    """
    ordered = sorted(entries, key=lambda e: (e.network.prefixlen, e.network.network_address))
    # kept[(prefixlen, network int)] = (entry, depth); a lookup per shorter length in
    # use finds every container, so this is linear in the entries, not quadratic.
    kept: dict[tuple[int, int], tuple[BlockEntry, int]] = {}
    lengths: list[int] = []
    for entry in ordered:
        network = entry.network
        bits = network.max_prefixlen
        address = int(network.network_address)
        containers = [found[0] for found in (
            kept.get((length, address >> (bits - length) << (bits - length)))
            for length in lengths if length < network.prefixlen) if found is not None]
        if any(_outlasts(outer, entry) for outer in containers):
            continue
        kept[(network.prefixlen, address)] = (entry, len(containers))
        if not lengths or lengths[-1] != network.prefixlen:
            lengths.append(network.prefixlen)
    levels: list[list[BlockEntry]] = [
        [] for _ in range(max((depth for _, depth in kept.values()), default=-1) + 1)]
    for entry, depth in kept.values():
        levels[depth].append(entry)
    return levels


def _outlasts(outer: BlockEntry, inner: BlockEntry) -> bool:
    if outer.expires_ns is None:
        return True
    return inner.expires_ns is not None and outer.expires_ns >= inner.expires_ns


def _nft_element(entry: BlockEntry, now_ns: int) -> str:
    remaining = entry.remaining_s(now_ns)
    return entry.cidr if remaining is None else f"{entry.cidr} timeout {remaining}s"


def _live(entries: list[BlockEntry], now_ns: int) -> list[BlockEntry]:
    return [entry for entry in entries if entry.active(now_ns)]


def _one_line(text: str) -> str:
    return " ".join(text.split())
