"""What ``guardntp clients`` and ``guardntp stats`` report, built from the filter's tables.

Rule: pure. Functions take the pipeline's tables and the monotonic time and
return plain dicts and lists (JSON as sent over the control socket); the
text forms for a terminal are here too, so the CLI only prints.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from typing import Any

from ..clock import ClockState
from ..filter import fingerprint
from ..filter.pipeline import Pipeline
from ..filter.reference import (
    DROPS,
    FIRST_SEEN,
    HOME_TTL,
    KODS,
    LABEL,
    LAST_CROWD,
    LAST_SEEN,
    OTHER_TTL,
    REQUESTS,
    TIME_REPLIES,
)
from ..timestamps import NS_PER_S, short_to_ns
from ..wire import refid_to_text

_NO_INTERVAL = 1 << 62

#: --sort NAME -> (key on a (table key, record) pair, largest first?)
SORT_KEYS: dict[str, tuple[Callable[[tuple[bytes, MutableSequence[Any]]], Any], bool]] = {
    "requests": (lambda item: item[1][REQUESTS], True),
    "replies": (lambda item: item[1][TIME_REPLIES], True),
    "kods": (lambda item: item[1][KODS], True),
    "drops": (lambda item: item[1][DROPS], True),
    "last": (lambda item: item[1][LAST_SEEN], True),
    "interval": (lambda item: fingerprint.mean_interval_ns(
        item[1][REQUESTS], item[1][FIRST_SEEN], item[1][LAST_SEEN]) or _NO_INTERVAL, False),
    "address": (lambda item: (len(item[0]), item[0]), False),
}


def source_text(key: bytes) -> str:
    """A table key as an operator reads it: an IPv4 address, or an IPv6 prefix."""
    if len(key) == 4:
        return str(ipaddress.IPv4Address(key))
    if len(key) == 16:
        return str(ipaddress.IPv6Address(key))
    padded = key.ljust(16, b"\0")
    return f"{ipaddress.IPv6Address(padded)}/{len(key) * 8}"


def client_rows(records: Mapping[bytes, MutableSequence[Any]], now_ns: int, sort: str = "requests",
                limit: int = 0) -> list[dict[str, Any]]:
    """The top ``limit`` sources by ``sort`` (0 = all), one dict each."""
    key, largest = SORT_KEYS[sort]
    items = records.items()
    if limit > 0:
        chosen = (heapq.nlargest if largest else heapq.nsmallest)(limit, items, key=key)
    else:
        chosen = sorted(items, key=key, reverse=largest)
    return [client_row(source, record, now_ns) for source, record in chosen]


def client_row(key: bytes, record: MutableSequence[Any], now_ns: int) -> dict[str, Any]:
    requests, first, last = record[REQUESTS], record[FIRST_SEEN], record[LAST_SEEN]
    labels = [record[LABEL]]
    if fingerprint.is_fast_poller(requests, first, last):
        labels.append(fingerprint.FAST_POLLER)
    interval = fingerprint.mean_interval_ns(requests, first, last)
    return {
        "source": source_text(key), "label": ",".join(labels), "requests": requests,
        "replies": record[TIME_REPLIES], "kods": record[KODS], "drops": record[DROPS],
        "interval_s": None if interval is None else round(interval / NS_PER_S, 3),
        "last_seen_s": round((now_ns - last) / NS_PER_S, 3),
        # The crowd estimate its latest request was charged with, and its TTL classes
        # (filter/crowd.py): home TTL and the latest other one (None: none seen).
        "crowd": record[LAST_CROWD],
        "ttl": None if record[HOME_TTL] < 0 else record[HOME_TTL],
        "other_ttl": None if record[OTHER_TTL] < 0 else record[OTHER_TTL],
    }


def stats_report(pipeline: Pipeline) -> dict[str, Any]:
    counters = pipeline.counters
    return {
        "packets": counters.total(),
        "verdicts": counters.by_verdict(),
        "reasons": counters.by_reason(),
        "versions": {str(v): reasons for v, reasons in counters.by_version().items()},
        "labels": dict(pipeline.label_counts),
        "bytes_in": counters.bytes_in, "bytes_out": counters.bytes_out,
        "tables": {
            name: {"entries": len(table), "max": table.max_entries,
                   "evictions": table.evictions, "refused": table.admissions_refused}
            for name, table in (("sources", pipeline.sources), ("prefixes", pipeline.prefixes))}
        | {"newcomers": {"entries": len(pipeline.newcomers),
                         "max": pipeline.newcomers.max_entries,
                         "evictions": pipeline.newcomers.evictions, "refused": 0}},
        "table_full": pipeline.table_full,
        "access_list_entries": len(pipeline.policy.acl),
        "lookup_table_entries": len(pipeline.acl),   # configuration + live blocklist
        "clock": clock_report(pipeline.responder.clock, pipeline.responder.wire_snapshot[1]),
    }


def clock_report(clock: ClockState, served_fields: bytes) -> dict[str, Any]:
    """The served clock: the source's snapshot and what replies carry.

    ``served_fields`` are bytes 3-23 of a time reply as the responder caches
    them (precision, root delay, root dispersion, refid, reference timestamp):
    root dispersion there is the one computed at the last clock refresh (at
    most a fraction of a second old), i.e. what clients are being told.
    """
    stratum = clock.wire_stratum
    return {
        "source": clock.source,
        "synchronized": clock.synchronized,
        "detail": clock.detail,
        "leap": clock.wire_leap.name.lower(),
        "stratum": stratum,
        "refid": refid_to_text(served_fields[9:13], stratum),
        "precision": clock.precision,
        "root_delay_s": short_to_ns(int.from_bytes(served_fields[1:5], "big")) / NS_PER_S,
        "root_dispersion_s": short_to_ns(int.from_bytes(served_fields[5:9], "big")) / NS_PER_S,
        "offset_s": clock.offset_ns / NS_PER_S,
    }


# ---------------------------------------------------------------------------- text

def format_clients(rows: list[dict[str, Any]]) -> str:
    header = ("SOURCE", "LABEL", "REQUESTS", "REPLIES", "KODS", "DROPS", "INTERVAL", "LAST",
              "CROWD", "TTL")
    table = [header] + [
        (row["source"], row["label"], str(row["requests"]), str(row["replies"]),
         str(row["kods"]), str(row["drops"]), _seconds(row["interval_s"]),
         _seconds(row["last_seen_s"]) + " ago", str(row.get("crowd", "-")), _ttls(row))
        for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    numeric = range(2, len(header))
    return "".join(
        "  ".join(cell.rjust(width) if column in numeric else cell.ljust(width)
                  for column, (cell, width) in enumerate(zip(line, widths, strict=True)))
        .rstrip() + "\n" for line in table)


def _ttls(row: Mapping[str, Any]) -> str:
    """"57", "57/44" (home, then another TTL class seen), or "-" (unknown; older servers)."""
    home, other = row.get("ttl"), row.get("other_ttl")
    if home is None:
        return "-"
    return f"{home}/{other}" if other is not None else str(home)


def format_stats(report: Mapping[str, Any]) -> str:
    lines = [f"packets      {report['packets']}"]
    clock = report.get("clock")   # absent from servers older than this client
    if clock:
        lines[:0] = _clock_lines(clock) + _upstream_lines(report.get("upstreams", ()))
    lines += [f"  {verdict:<10} {count}" for verdict, count in report["verdicts"].items()]
    lines.append("reasons")
    lines += [f"  {reason:<18} {count}" for reason, count in
              sorted(report["reasons"].items(), key=lambda item: -item[1])]
    lines.append("labels")
    lines += [f"  {label:<20} {count}" for label, count in report["labels"].items()]
    lines.append("tables")
    for name, table in report["tables"].items():
        lines.append(f"  {name:<9} {table['entries']}/{table['max']} entries, "
                     f"{table['evictions']} evictions, {table['refused']} refused")
    lines.append(f"  table_full {report['table_full']} second requests that found no room "
                 "among established sources")
    lines.append(f"access list  {report['access_list_entries']} entries")
    blocklist = report.get("blocklist")
    if blocklist:
        lines.append(f"blocklist    {blocklist['active_entries']} active entries, "
                     f"{blocklist['auto_blocked']} auto-blocked, automatic blocking "
                     f"{'on' if blocklist['auto'] else 'off'}"
                     + (f"; error: {blocklist['error']}" if blocklist["error"] else ""))
    nts = report.get("nts")
    if nts:
        lines += _nts_lines(nts)
    lines.append(f"bytes        {report['bytes_in']} in, {report['bytes_out']} out")
    if report.get("decision_errors"):   # a bug: the server's log has the first of each minute
        lines.append(f"errors       {report['decision_errors']} decisions raised (their "
                     "datagrams were dropped; see the server's log)")
    if "uptime_s" in report:
        lines.append(f"uptime       {report['uptime_s']:.0f} s")
    return "\n".join(lines) + "\n"


def _clock_lines(clock: Mapping[str, Any]) -> list[str]:
    state = "synchronised" if clock["synchronized"] else "NOT synchronised"
    lines = [f"clock        {clock['source']}, {state}"
             + (f" ({clock['detail']})" if clock["detail"] else ""),
             f"  serving    leap {clock['leap']}, stratum {clock['stratum']}, "
             f"refid {clock['refid'] or '-'}, root delay {clock['root_delay_s']:.6f} s, "
             f"root dispersion {clock['root_dispersion_s']:.6f} s"]
    if clock["offset_s"]:
        lines.append(f"  offset     {clock['offset_s']:+.6f} s added to the system clock")
    return lines


def _nts_lines(nts: Mapping[str, Any]) -> list[str]:
    ke, ntp = nts.get("ke", {}), nts.get("ntp", {})

    def total(table: Mapping[str, Any], prefix: str) -> int:
        return sum(int(v) for k, v in table.items() if k.startswith(prefix))

    lines = [f"nts-ke       {ke.get('ke_ok', 0)} key exchanges, "
             f"{ke.get('ke_cookies_issued', 0)} cookies issued, "
             f"{total(ke, 'ke_refused')} connections refused by the limits, "
             f"{ke.get('ke_tls_failed', 0)} TLS failures, {ke.get('ke_timeout', 0)} timeouts",
             f"nts          {ntp.get('nts_answered', 0)} answered, "
             f"{total(ntp, 'nts_nak')} NAKs, {total(ntp, 'nts_drop')} dropped, "
             f"{ntp.get('nts_cookies_issued', 0)} cookies issued; "
             f"{nts.get('master_keys', 0)} master keys"
             + (f"; error: {nts['key_error']}" if nts.get("key_error") else "")]
    return lines


def _upstream_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per upstream: what the selection made of it, and why."""
    lines = []
    for row in rows:
        status = str(row["status"]) + (" (system peer)" if row.get("system_peer") else "")
        offset = row.get("offset_s")
        distance = row.get("root_distance_s")
        figures = (f"offset {offset * 1000:+.3f} ms" if offset is not None else "no offset") \
            + (f", distance {distance * 1000:.1f} ms" if distance is not None else "") \
            + (f", stratum {row['stratum']}" if row.get("stratum") is not None else "")
        reason = f"; {row['reason']}" if row.get("reason") else ""
        lines.append(f"  upstream   {row['source']}: {status}, {figures}{reason}")
    return lines


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    if value < 3600:
        return f"{value:.0f}s"
    return f"{value / 3600:.1f}h"
