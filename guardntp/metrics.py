"""The Prometheus endpoint (``[metrics] listen``, ``--metrics HOST:PORT``).

Rule: the packet path pays nothing for metrics. The pipeline already counts
every packet in flat sequences of integers (``Counters.counts`` and
``label_counts.counts``: ``_fastlane.Counts`` the compiled core adds to in place,
the tables' eviction counts); :class:`GuardntpCollector` reads them when
Prometheus scrapes, in the HTTP server's thread, and turns them into metric
families. No per-packet Prometheus call exists. Copying one into a list under
the GIL runs no Python code, so a scrape sees each counter at one instant,
never half-updated.

Label sets are bounded by construction: NTP version (3 bits), reason (the
``Reason`` enum), fingerprint label (``fingerprint.PACKET_LABELS``), table
name, KoD code. No label ever carries an address.

``prometheus_client`` is an optional dependency (``pip install 'guardntp[metrics]'``,
Debian ``python3-prometheus-client``); without it only the metrics endpoint is
unavailable, with a one-line error naming the package.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .filter import fingerprint
from .verdicts import N_REASONS, N_VERSIONS, VERDICT_OF, Reason

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from .filter.pipeline import Pipeline
    from .netaddr import ListenSpec
    from .server import Server

log = logging.getLogger("guardntp.metrics")

#: Versions whose series exist from the start (so rate() works before the first
#: packet); other version numbers appear once a packet with them arrives.
ALWAYS_VERSIONS = (1, 2, 3, 4)
_NS = 1e-9


class MetricsError(Exception):
    """The metrics endpoint cannot start; one line for the operator."""


def require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsError(
            "metrics: the Python package prometheus_client is not installed "
            "(pip install 'guardntp[metrics]' or apt install python3-prometheus-client), "
            "or turn metrics off (no [metrics] listen, no --metrics)") from None
    return prometheus_client


_TABLES = ("sources", "prefixes", "newcomers")


class _SocketCounts(Protocol):
    send_errors: int
    truncated: int
    decision_errors: int


def counter_snapshot(pipeline: Pipeline, server: _SocketCounts | None = None
                     ) -> dict[str, Any]:
    """Every count a scrape reports, as plain JSON-able data (one worker's share)."""
    newcomers = pipeline.newcomers
    tables = {name: {"entries": len(table), "capacity": table.max_entries,
                     "evictions": table.evictions, "refused": table.admissions_refused}
              for name, table in (("sources", pipeline.sources),
                                  ("prefixes", pipeline.prefixes))}
    tables["newcomers"] = {"entries": len(newcomers), "capacity": newcomers.max_entries,
                           "evictions": newcomers.evictions, "refused": 0}
    return {
        "counts": list(pipeline.counters.counts),
        "labels": dict(pipeline.label_counts),
        "bytes_in": pipeline.counters.bytes_in, "bytes_out": pipeline.counters.bytes_out,
        "send_errors": server.send_errors if server is not None else None,
        "truncated": server.truncated if server is not None else None,
        "decision_errors": server.decision_errors if server is not None else None,
        "tables": tables,
        "table_full": pipeline.table_full,
        "nts": _nts_counts(pipeline),
    }


def _nts_counts(pipeline: Pipeline) -> dict[str, int]:
    """NTS requests by outcome (``nts_answered``, ``nts_nak_*``, ``nts_drop_*``, cookies)."""
    counters = getattr(pipeline.nts, "counters", None)
    snapshot = getattr(counters, "snapshot", None)
    return dict(snapshot()) if snapshot is not None else {}


def add_snapshots(total: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Add another worker's :func:`counter_snapshot` into ``total``."""
    counts = total["counts"]
    for index, value in enumerate(other.get("counts", ())[:len(counts)]):
        counts[index] += int(value)
    for label, value in other.get("labels", {}).items():
        total["labels"][label] = total["labels"].get(label, 0) + int(value)
    for key in ("bytes_in", "bytes_out", "table_full", "send_errors", "truncated",
                "decision_errors"):
        if total.get(key) is not None and other.get(key) is not None:
            total[key] += int(other[key])
    for name, value in other.get("nts", {}).items():
        total["nts"][name] = total["nts"].get(name, 0) + int(value)
    for name, table in other.get("tables", {}).items():
        if name in total["tables"]:
            for field, value in table.items():
                total["tables"][name][field] += int(value)


class GuardntpCollector:
    """Reads the live counters at scrape time (register it with a CollectorRegistry).

    ``peers``: with ``--workers``, returns the other workers' :func:`counter_snapshot`
    so the figures are the whole server's. The clock is the same in every worker.
    """

    def __init__(self, pipeline: Pipeline, server: Server | None = None,
                 reloads: Mapping[str, int] | None = None,
                 log_suppressed: Callable[[], int] | None = None,
                 wall_ns: Callable[[], int] = time.time_ns,
                 peers: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.pipeline = pipeline
        self.server = server
        self.reloads = reloads
        self.log_suppressed = log_suppressed
        self.wall_ns = wall_ns
        self.peers = peers

    def describe(self) -> Iterator[Any]:
        return self.collect()

    def snapshot(self) -> dict[str, Any]:
        total = counter_snapshot(self.pipeline, self.server)
        for other in self.peers() if self.peers is not None else ():
            add_snapshots(total, other)
        return total

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        snapshot = self.snapshot()
        counts = snapshot["counts"]

        packets = CounterMetricFamily(
            "guardntp_packets", "Datagrams received, by NTP version, verdict and reason "
            "(every datagram is counted once)", labels=["version", "verdict", "reason"])
        kods = {Reason.RATE_KOD: 0, Reason.DENY_KOD: 0}
        for version in range(N_VERSIONS):
            row = counts[version * N_REASONS:(version + 1) * N_REASONS]
            if version not in ALWAYS_VERSIONS and not any(row):
                continue
            for reason in Reason:
                packets.add_metric([str(version), VERDICT_OF[reason].value, reason.name.lower()],
                                   row[reason])
                if reason in kods:
                    kods[reason] += row[reason]
        yield packets

        kod = CounterMetricFamily("guardntp_kod_sent", "Kiss-o'-Death replies sent, by code",
                                  labels=["code"])
        kod.add_metric(["RATE"], kods[Reason.RATE_KOD])
        kod.add_metric(["DENY"], kods[Reason.DENY_KOD])
        yield kod

        labels = CounterMetricFamily(
            "guardntp_requests_by_label", "Requests past the sanity and reflection checks, "
            "by client fingerprint", labels=["label"])
        label_counts = snapshot["labels"]
        for label in fingerprint.PACKET_LABELS:
            labels.add_metric([label], label_counts.get(label, 0))
        yield labels

        yield CounterMetricFamily("guardntp_received_bytes", "UDP payload bytes received",
                                  value=snapshot["bytes_in"])
        yield CounterMetricFamily("guardntp_sent_bytes", "UDP payload bytes sent",
                                  value=snapshot["bytes_out"])
        if snapshot["send_errors"] is not None:
            yield CounterMetricFamily("guardntp_send_errors", "sendto() calls that failed",
                                      value=snapshot["send_errors"])
            yield CounterMetricFamily("guardntp_truncated_datagrams",
                                      "Datagrams longer than the receive buffer",
                                      value=snapshot["truncated"])
        if snapshot.get("decision_errors") is not None:
            yield CounterMetricFamily(
                "guardntp_decision_errors",
                "Decisions that raised (a bug): the batch, or datagram, was dropped",
                value=snapshot["decision_errors"])

        yield from self._tables(snapshot, CounterMetricFamily, GaugeMetricFamily)
        yield from self._nts(snapshot, CounterMetricFamily)
        yield from self._clock(GaugeMetricFamily, InfoMetricFamily)

        if self.reloads is not None:
            reloads = CounterMetricFamily("guardntp_config_reloads",
                                          "Configuration reloads, by result", labels=["result"])
            for result in ("ok", "rejected"):
                reloads.add_metric([result], self.reloads.get(result, 0))
            yield reloads
        if self.log_suppressed is not None:
            yield CounterMetricFamily("guardntp_log_messages_suppressed",
                                      "Log messages held back by the repeat limit",
                                      value=self.log_suppressed())
        info = InfoMetricFamily("guardntp_build", "guardntp version")
        info.add_metric([], {"version": __version__})
        yield info

    def _tables(self, snapshot: Mapping[str, Any], counter: Any, gauge: Any
                ) -> Iterator[Any]:
        entries = gauge("guardntp_table_entries", "Entries in the rate-limit tables",
                        labels=["table"])
        capacity = gauge("guardntp_table_capacity", "Maximum entries of the rate-limit tables",
                         labels=["table"])
        evictions = counter("guardntp_table_evictions",
                            "Entries evicted (only entries whose bucket had refilled)",
                            labels=["table"])
        refused = counter("guardntp_table_admissions_refused",
                          "New keys refused because the table was full of active entries",
                          labels=["table"])
        for name in _TABLES:
            table = snapshot["tables"][name]
            entries.add_metric([name], table["entries"])
            capacity.add_metric([name], table["capacity"])
            evictions.add_metric([name], table["evictions"])
            if name != "newcomers":
                refused.add_metric([name], table["refused"])
        yield from (entries, capacity, evictions, refused)
        yield counter("guardntp_promotions_refused",
                      "Second requests that found no room among established sources "
                      "(the source stays a newcomer, limited by its remembered bucket)",
                      value=snapshot["table_full"])
        yield gauge("guardntp_access_list_entries",
                    "Access-list entries in force (configuration and blocklist)",
                    value=len(self.pipeline.acl))

    def _nts(self, snapshot: Mapping[str, Any], counter: Any) -> Iterator[Any]:
        """NTS requests by outcome, and NTS-KE events (only where NTS is on)."""
        nts = self.pipeline.nts
        if nts is None:
            return
        requests = counter("guardntp_nts_requests", "NTS-protected requests by outcome "
                           "(answered, nak_*, drop_*) and cookies issued", labels=["outcome"])
        for name, value in snapshot["nts"].items():
            requests.add_metric([name.removeprefix("nts_")], value)
        yield requests
        report = getattr(nts, "report", None)
        ke = report()["ke"] if report is not None else {}
        if ke:   # worker 0's KE server (the other workers answer NTS requests only)
            events = counter("guardntp_nts_ke", "NTS-KE connections and handshakes by event",
                             labels=["event"])
            for name, value in ke.items():
                events.add_metric([name.removeprefix("ke_")], value)
            yield events

    def _clock(self, gauge: Any, info: Any) -> Iterator[Any]:
        clock = self.pipeline.responder.clock
        yield gauge("guardntp_clock_synchronized",
                    "1 when the served clock is synchronised (replies carry LI != 3)",
                    value=1 if clock.synchronized else 0)
        yield gauge("guardntp_clock_stratum", "Stratum served (0 when unsynchronised)",
                    value=clock.wire_stratum)
        yield gauge("guardntp_clock_leap", "Leap indicator served (3 = unsynchronised)",
                    value=int(clock.wire_leap))
        yield gauge("guardntp_clock_root_delay_seconds", "Root delay served",
                    value=clock.root_delay_ns * _NS)
        yield gauge("guardntp_clock_root_dispersion_seconds",
                    "Root dispersion served now (grows 15 ppm between updates)",
                    value=clock.root_dispersion_at(self.wall_ns()) * _NS)
        yield gauge("guardntp_clock_offset_seconds",
                    "Correction added to the system clock (nonzero only for --clock upstream)",
                    value=clock.offset_ns * _NS)
        source = info("guardntp_clock_source", "Where the served time comes from")
        source.add_metric([], {"source": clock.source})
        yield source
        summary = getattr(getattr(self.server, "source", None), "selection_summary", None)
        if summary is not None:   # --clock upstream: what the selection made of them
            figures = summary()
            upstreams = gauge("guardntp_clock_upstream_sources",
                              "Upstream sources by the selection's verdict", labels=["status"])
            for status, count in dict(figures["sources"]).items():
                upstreams.add_metric([status], count)
            yield upstreams
            yield gauge("guardntp_clock_frequency_ppm",
                        "Frequency of the local clock against the upstreams",
                        value=figures["frequency_ppm"])
            pending = figures["pending_jump_s"]
            yield gauge("guardntp_clock_jump_pending",
                        "1 while the majority reports a jump not yet followed (stepout)",
                        value=0 if pending is None else 1)


def make_registry(collector: GuardntpCollector) -> CollectorRegistry:
    """A registry with the guardntp collector and the process' CPU and memory."""
    prometheus_client = require_prometheus()
    registry: CollectorRegistry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    prometheus_client.ProcessCollector(registry=registry)
    return registry


def is_loopback(spec: ListenSpec) -> bool:
    return ipaddress.ip_address(spec.host).is_loopback


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes (``/metrics``), in its own thread."""

    def __init__(self, spec: ListenSpec, registry: CollectorRegistry) -> None:
        prometheus_client = require_prometheus()
        try:
            started = prometheus_client.start_http_server(spec.port, spec.host, registry)
        except OSError as error:
            raise MetricsError(f"metrics: cannot listen on {spec}: {error.strerror}") from None
        # prometheus_client >= 0.19 returns (server, thread); older ones return None.
        self.http = started[0] if started else None
        self.spec = spec
        if not is_loopback(spec):
            log.warning("metrics on %s, not loopback: anyone who can reach it sees the "
                        "counters; firewall it", spec)
        log.info("metrics on http://%s/metrics", spec)

    @property
    def port(self) -> int:
        return int(self.http.server_port) if self.http is not None else self.spec.port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
