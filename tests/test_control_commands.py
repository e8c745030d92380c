"""The control commands over a pipeline, and the workers' figures added up."""

from __future__ import annotations

from typing import Any

import pytest

from guardntp.control.merge import merge_client_rows, merge_stats
from guardntp.control.reports import format_stats
from guardntp.control.service import ControlCommands
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.metrics import GuardntpCollector
from guardntp.responder import Responder
from guardntp.timesources.local import LocalClock

REQUEST = bytes([0x23]) + bytes(47)


class _Loop:
    send_errors = 0
    truncated = 0
    decision_errors = 0

    def add_reader(self, fileobj: Any, callback: Any) -> None: ...

    def remove_reader(self, fileobj: Any) -> None: ...

    def add_periodic(self, interval_s: float, callback: Any) -> None: ...


class _Peers:
    """Another worker, answering with its own commands object."""

    def __init__(self, *others: ControlCommands) -> None:
        self.others = others

    def __len__(self) -> int:
        return len(self.others)

    def ask(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return [other.answer_peer(dict(request)) for other in self.others]


def _commands(sources: list[bytes], peers: _Peers | None = None) -> ControlCommands:
    now = 10**18
    pipeline = Pipeline(FilterPolicy(), Responder(LocalClock(stratum=10).state(now), now))
    for i, source in enumerate(sources):
        pipeline.decide(REQUEST, source, 40000 + i, now, 10**12 + i)
    return ControlCommands(pipeline, _Loop(), None, lambda: "reloaded", peers)


@pytest.mark.parametrize("sort", [["requests"], {"a": 1}, 3, None])
def test_a_sort_that_is_not_a_name_is_a_one_line_error(sort: object) -> None:
    commands = _commands([bytes([192, 0, 2, 1])])
    with pytest.raises(ValueError, match="unknown sort"):
        commands.clients({"command": "clients", "sort": sort}, 1 << 16)


def test_stats_and_clients_cover_every_worker() -> None:
    other = _commands([bytes([198, 51, 100, n]) for n in range(1, 4)])
    worker0 = _commands([bytes([192, 0, 2, 1])], _Peers(other))
    stats = worker0.stats({"command": "stats"}, 1 << 16)
    assert stats["packets"] == 4 and stats["verdicts"]["time"] == 4
    assert stats["tables"]["sources"]["entries"] == 4
    assert stats["workers"] == 2 and stats["workers_answered"] == 2
    clients = worker0.clients({"command": "clients", "sort": "address"}, 1 << 16)
    assert clients["total"] == 4
    assert [row["source"] for row in clients["clients"]] == [
        "192.0.2.1", "198.51.100.1", "198.51.100.2", "198.51.100.3"]
    top = worker0.clients({"command": "clients", "limit": 2}, 1 << 16)
    assert len(top["clients"]) == 2 and top["truncated"] is False  # cut by the limit asked


def test_a_worker_that_does_not_answer_is_shown_as_missing() -> None:
    class Silent(_Peers):
        def ask(self, request: dict[str, Any]) -> list[dict[str, Any]]:
            return []

    worker0 = _commands([bytes([192, 0, 2, 1])], Silent(_commands([])))
    stats = worker0.stats({"command": "stats"}, 1 << 16)
    assert stats["workers"] == 2 and stats["workers_answered"] == 1


def test_merge_adds_counts_and_keeps_shared_figures() -> None:
    merged = merge_stats([
        {"packets": 2, "verdicts": {"time": 2}, "labels": {"a": 1},
         "access_list_entries": 5, "uptime_s": 3.0},
        {"packets": 3, "verdicts": {"time": 1, "drop": 2}, "labels": {"b": 4},
         "access_list_entries": 5, "uptime_s": 9.0}])
    assert merged == {"packets": 5, "verdicts": {"time": 3, "drop": 2},
                      "labels": {"a": 1, "b": 4}, "access_list_entries": 5, "uptime_s": 3.0}


def test_merged_rows_follow_the_sort_of_each_worker() -> None:
    rows = [[{"source": "192.0.2.9", "requests": 5, "interval_s": None, "last_seen_s": 1.0}],
            [{"source": "10.0.0.1", "requests": 9, "interval_s": 2.0, "last_seen_s": 4.0},
             {"source": "2001:db8::/64", "requests": 1, "interval_s": 1.0,
              "last_seen_s": 0.5}]]
    def order(sort: str) -> list[str]:
        return [row["source"] for row in merge_client_rows(rows, sort, 0)]
    assert order("requests") == ["10.0.0.1", "192.0.2.9", "2001:db8::/64"]
    assert order("interval") == ["2001:db8::/64", "10.0.0.1", "192.0.2.9"]
    assert order("last") == ["2001:db8::/64", "192.0.2.9", "10.0.0.1"]
    assert order("address") == ["10.0.0.1", "192.0.2.9", "2001:db8::/64"]
    assert len(merge_client_rows(rows, "requests", 2)) == 2


class _Upstreams:
    def selection_report(self) -> list[dict[str, object]]:
        return [{"source": "127.0.0.2:123", "status": "selected", "reason": "",
                 "system_peer": True, "stratum": 2, "offset_s": 0.000012,
                 "root_distance_s": 0.0251},
                {"source": "127.0.0.3:123", "status": "falseticker",
                 "reason": "offset +2.000 s misses the majority's interval",
                 "system_peer": False, "stratum": 1, "offset_s": 2.0, "root_distance_s": 0.001}]

    def selection_summary(self) -> dict[str, object]:
        return {"sources": {"selected": 1, "falseticker": 1, "outlier": 0, "unusable": 0},
                "frequency_ppm": 1.5, "system_peer": "127.0.0.2:123", "pending_jump_s": None,
                "note": ""}


def test_stats_say_which_upstreams_are_selected_and_why() -> None:
    commands = _commands([bytes([192, 0, 2, 1])])
    commands.upstreams = _Upstreams()
    report = commands.stats({"command": "stats"}, 1 << 16)
    assert [row["status"] for row in report["upstreams"]] == ["selected", "falseticker"]
    text = format_stats(report)
    assert "upstream   127.0.0.2:123: selected (system peer), offset +0.012 ms" in text
    assert "127.0.0.3:123: falseticker" in text and "misses the majority" in text


def test_metrics_count_upstreams_by_verdict() -> None:
    pytest.importorskip("prometheus_client")
    commands = _commands([])

    class Server(_Loop):
        source = _Upstreams()

    collector = GuardntpCollector(commands.pipeline, Server())  # type: ignore[arg-type]
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in collector.collect() for sample in family.samples}
    assert samples[("guardntp_clock_upstream_sources", (("status", "falseticker"),))] == 1
    assert samples[("guardntp_clock_jump_pending", ())] == 0
