"""Adding up the figures of several ``--workers`` into one server's.

Rule: pure. Each worker reports on its own share of the sources (requests are
steered by source prefix, so no source is in two workers); the server's
figures are the sums, and its top talkers the top of all the workers' tops.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The same in every worker (configuration, or worker 0's own view): not added up.
SHARED_KEYS = frozenset({"access_list_entries", "lookup_table_entries", "clock", "uptime_s",
                         "upstreams", "selection", "master_keys", "rotations",
                         "key_error"})


def merge_stats(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report with every count added up; shared keys from the first report."""
    if not reports:
        return {}
    total: dict[str, Any] = copy.deepcopy(dict(reports[0]))
    for report in reports[1:]:
        _add_into(total, report)
    return total


def _add_into(total: dict[str, Any], report: Mapping[str, Any]) -> None:
    for key, value in report.items():
        if key in SHARED_KEYS:
            continue
        mine = total.get(key)
        if isinstance(value, Mapping):
            if not isinstance(mine, dict):
                mine = total[key] = {}
            _add_into(mine, value)
        elif _is_count(value):
            total[key] = (mine if _is_count(mine) else 0) + value
        elif key not in total:
            total[key] = copy.deepcopy(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _address_order(row: Mapping[str, Any]) -> tuple[int, bytes]:
    text = str(row["source"]).split("/", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return (9, text.encode())
    return (address.version, address.packed)


_NONE_LAST = float("inf")

#: --sort NAME -> the order of rows as ``reports.SORT_KEYS`` orders records.
ROW_ORDER: dict[str, tuple[Callable[[Mapping[str, Any]], Any], bool]] = {
    "requests": (lambda row: row["requests"], True),
    "replies": (lambda row: row["replies"], True),
    "kods": (lambda row: row["kods"], True),
    "drops": (lambda row: row["drops"], True),
    "last": (lambda row: row["last_seen_s"], False),
    "interval": (lambda row: _NONE_LAST if row["interval_s"] is None else row["interval_s"],
                 False),
    "address": (_address_order, False),
}


def merge_client_rows(row_lists: list[list[dict[str, Any]]], sort: str,
                      limit: int) -> list[dict[str, Any]]:
    """The top ``limit`` rows (0 = all) of several workers' top lists, by ``sort``."""
    if len(row_lists) == 1:
        rows = row_lists[0]
    else:
        key, largest = ROW_ORDER[sort]
        rows = sorted((row for rows in row_lists for row in rows), key=key, reverse=largest)
    return rows[:limit] if limit > 0 else rows
