"""The Prometheus endpoint (``[metrics] listen``, ``--metrics HOST:PORT``).

Rule: the packet path pays nothing for metrics. The pipeline already counts
every packet in plain integer lists (``Counters``, ``label_counts``, the
tables' eviction counts); :class:`GuardntpCollector` reads them when Prometheus
scrapes, in the HTTP server's thread, and turns them into metric families. No
per-packet Prometheus call exists. Copying a list of ints under the GIL is
atomic, so a scrape sees each counter at one instant, never half-updated.

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
from typing import TYPE_CHECKING, Any

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


class GuardntpCollector:
    """Reads the live counters at scrape time (register it with a CollectorRegistry)."""

    def __init__(self, pipeline: Pipeline, server: Server | None = None,
                 reloads: Mapping[str, int] | None = None,
                 log_suppressed: Callable[[], int] | None = None,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.pipeline = pipeline
        self.server = server
        self.reloads = reloads
        self.log_suppressed = log_suppressed
        self.wall_ns = wall_ns

    def describe(self) -> Iterator[Any]:
        return self.collect()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        pipeline = self.pipeline
        counts = list(pipeline.counters.counts)

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
        label_counts = dict(pipeline.label_counts)
        for label in fingerprint.PACKET_LABELS:
            labels.add_metric([label], label_counts.get(label, 0))
        yield labels

        yield CounterMetricFamily("guardntp_received_bytes", "UDP payload bytes received",
                                  value=pipeline.counters.bytes_in)
        yield CounterMetricFamily("guardntp_sent_bytes", "UDP payload bytes sent",
                                  value=pipeline.counters.bytes_out)
        if self.server is not None:
            yield CounterMetricFamily("guardntp_send_errors", "sendto() calls that failed",
                                      value=self.server.send_errors)
            yield CounterMetricFamily("guardntp_truncated_datagrams",
                                      "Datagrams longer than the receive buffer",
                                      value=self.server.truncated)

        yield from self._tables(CounterMetricFamily, GaugeMetricFamily)
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

    def _tables(self, counter: Any, gauge: Any) -> Iterator[Any]:
        pipeline = self.pipeline
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
        for name, table in (("sources", pipeline.sources), ("prefixes", pipeline.prefixes)):
            entries.add_metric([name], len(table))
            capacity.add_metric([name], table.max_entries)
            evictions.add_metric([name], table.evictions)
            refused.add_metric([name], table.admissions_refused)
        entries.add_metric(["newcomers"], len(pipeline.newcomers))
        capacity.add_metric(["newcomers"], pipeline.newcomers.max_entries)
        evictions.add_metric(["newcomers"], pipeline.newcomers.evictions)
        yield from (entries, capacity, evictions, refused)
        yield counter("guardntp_promotions_refused",
                      "Second requests that found no room among established sources "
                      "(the source stays a newcomer, limited by its remembered bucket)",
                      value=pipeline.table_full)
        yield gauge("guardntp_access_list_entries",
                    "Access-list entries in force (configuration and blocklist)",
                    value=len(pipeline.acl))

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
