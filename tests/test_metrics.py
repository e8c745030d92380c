"""Metrics: the collector reads the pipeline's own counters at scrape time; the endpoint
is scraped over loopback from a running server."""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_tcp_port, guardntp_server
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guardntp import cli, client
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.metrics import GuardntpCollector, MetricsError, require_prometheus
from guardntp.responder import Responder
from guardntp.timesources.local import LocalClock

V4_CLIENT = bytes([0x23]) + bytes(47)
V3_CLIENT = bytes([0x1B]) + bytes(47)
MONLIST = bytes([0x17, 0x00, 0x03, 0x2A]) + bytes(44)  # mode 7 (v2), never answered
NOW = 10**18


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_collector(collector: GuardntpCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def make_pipeline(**policy: object) -> Pipeline:
    clock = LocalClock().state(NOW)
    return Pipeline(replace(FilterPolicy(), **policy), Responder(clock, NOW))  # type: ignore[arg-type]


def test_collector_reports_verdicts_reasons_versions_labels_kods_and_tables() -> None:
    pipeline = make_pipeline(source_rate=0.01, source_burst=2, leak_one_in=0, kod_interval_s=0.0)
    collector = GuardntpCollector(pipeline, reloads={"ok": 2, "rejected": 1},
                                  log_suppressed=lambda: 7, wall_ns=lambda: NOW)
    before = scrape_collector(collector)
    assert value(before, "guardntp_packets_total", version="4", verdict="time",
                 reason="answered") == 0
    source = bytes([192, 0, 2, 1])
    for i in range(5):  # 2 answered, 3 RATE KoD
        pipeline.decide(V4_CLIENT, source, 40000, NOW, NOW + i)
    pipeline.decide(V3_CLIENT, bytes([192, 0, 2, 2]), 40000, NOW, NOW)
    pipeline.decide(MONLIST, source, 40000, NOW, NOW)
    pipeline.decide(V4_CLIENT, bytes([198, 51, 100, 1]), 53, NOW, NOW)  # reflection port
    pipeline.decide(b"\x23short", source, 40000, NOW, NOW)
    after = scrape_collector(collector)
    assert value(after, "guardntp_packets_total", version="4", verdict="time",
                 reason="answered") == 2
    assert value(after, "guardntp_packets_total", version="4", verdict="kod",
                 reason="rate_kod") == 3
    assert value(after, "guardntp_packets_total", version="3", verdict="time",
                 reason="answered") == 1
    assert value(after, "guardntp_packets_total", version="2", verdict="drop",
                 reason="private_mode") == 1
    assert value(after, "guardntp_packets_total", version="4", verdict="drop",
                 reason="reflection_port") == 1
    assert value(after, "guardntp_packets_total", version="4", verdict="drop",
                 reason="malformed") == 1
    assert value(after, "guardntp_kod_sent_total", code="RATE") == 3
    assert value(after, "guardntp_kod_sent_total", code="DENY") == 0
    assert value(after, "guardntp_requests_by_label_total", label="ntpv4") == 5
    assert value(after, "guardntp_requests_by_label_total", label="ntpv3") == 1
    assert value(after, "guardntp_table_entries", table="sources") == 2
    assert value(after, "guardntp_table_capacity", table="sources") == 262144
    assert value(after, "guardntp_config_reloads_total", result="rejected") == 1
    assert value(after, "guardntp_log_messages_suppressed_total") == 7
    assert value(after, "guardntp_clock_synchronized") == 1
    assert value(after, "guardntp_clock_stratum") == 10
    assert value(after, "guardntp_clock_source_info", source="local") == 1


def test_evictions_and_overflow_are_counted() -> None:
    pipeline = make_pipeline(max_sources=4, leak_one_in=0)
    for i in range(10):  # sources 4-9 find the table full: first sightings wait as newcomers
        pipeline.decide(V4_CLIENT, bytes([10, 0, 0, i]), 40000, NOW, NOW + i * 10**10)
    for i in range(4, 10):  # their second request promotes them, evicting refilled entries
        pipeline.decide(V4_CLIENT, bytes([10, 0, 0, i]), 40000, NOW, NOW + (10 + i) * 10**10)
    samples = scrape_collector(GuardntpCollector(pipeline))
    assert value(samples, "guardntp_table_entries", table="sources") == 4
    assert value(samples, "guardntp_table_evictions_total", table="sources") == 6
    assert value(samples, "guardntp_table_entries", table="newcomers") == 0
    assert value(samples, "guardntp_promotions_refused_total") == 0


def test_series_stay_bounded_however_many_sources_send() -> None:
    pipeline = make_pipeline()
    collector = GuardntpCollector(pipeline)
    pipeline.decide(V4_CLIENT, bytes([10, 0, 0, 1]), 40000, NOW, NOW)
    few = len(scrape_collector(collector))
    for i in range(20_000):
        packed = (0x0A000000 + i).to_bytes(4, "big")
        pipeline.decide(V4_CLIENT if i % 2 else V3_CLIENT, packed, 1024 + i % 60000, NOW,
                        NOW + i)
    many = scrape_collector(collector)
    assert len(many) == few
    assert not any("10.0." in repr(key) for key in many)


def test_clock_offset_and_dispersion_of_an_upstream_source() -> None:
    pipeline = make_pipeline()
    upstream = replace(LocalClock().state(NOW), source="upstream", offset_ns=-1_500_000,
                       root_dispersion_ns=2_000_000, root_delay_ns=30_000_000, stratum=2,
                       reference_unix_ns=NOW - 100 * 10**9)
    pipeline.responder.set_clock(upstream, NOW)
    samples = scrape_collector(GuardntpCollector(pipeline, wall_ns=lambda: NOW))
    assert value(samples, "guardntp_clock_offset_seconds") == pytest.approx(-0.0015)
    assert value(samples, "guardntp_clock_root_delay_seconds") == pytest.approx(0.030)
    # 2 ms + 15 ppm of 100 s = 3.5 ms
    assert value(samples, "guardntp_clock_root_dispersion_seconds") == pytest.approx(0.0035)
    assert value(samples, "guardntp_clock_stratum") == 2
    assert value(samples, "guardntp_clock_source_info", source="upstream") == 1


def test_without_prometheus_client_the_error_names_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(MetricsError, match="prometheus_client is not installed"):
        require_prometheus()
    status = cli.main(["serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:1",
                       "--metrics", "127.0.0.1:9976"])
    err = capsys.readouterr().err
    assert status == 1
    assert "pip install 'guardntp[metrics]'" in err and "Traceback" not in err


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def settled_scrape(port: int) -> Samples:
    """A scrape once the counters stand still: the compiled loop publishes what it
    counted when its socket has been quiet for a millisecond, so a reply can reach
    its client just before the counters reach the metrics."""
    previous = scrape(port)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.02)
        current = scrape(port)
        if value(current, "guardntp_received_bytes_total") == \
                value(previous, "guardntp_received_bytes_total"):
            return current
        previous = current
    return previous


def test_endpoint_scraped_over_loopback_moves_with_queries(tmp_path: Path) -> None:
    metrics_port = free_tcp_port()
    with guardntp_server(tmp_path, "--metrics", f"127.0.0.1:{metrics_port}") as server:
        before = settled_scrape(metrics_port)
        for _ in range(3):
            client.exchange("127.0.0.1", server.port, timeout_s=2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.sendto(MONLIST, ("127.0.0.1", server.port))
        deadline = time.monotonic() + 5
        while True:
            # (the packet counts move at once; the byte counts when the loop next
            # publishes them, within a pump or a lull)
            after = scrape(metrics_port)
            if (value(after, "guardntp_packets_total", version="2", verdict="drop",
                      reason="private_mode")
                    and value(after, "guardntp_received_bytes_total")
                    > value(before, "guardntp_received_bytes_total") + 3 * 48) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        answered = ("guardntp_packets_total", (("reason", "answered"), ("verdict", "time"),
                                                ("version", "4")))
        assert after[answered] - before[answered] == 3
        assert value(after, "guardntp_packets_total", version="2", verdict="drop",
                     reason="private_mode") == 1
        assert value(after, "guardntp_received_bytes_total") - \
            value(before, "guardntp_received_bytes_total") == 3 * 48 + len(MONLIST)
        assert value(after, "guardntp_clock_synchronized") == 1
        assert value(after, "guardntp_config_reloads_total", result="ok") == 0
        assert ("process_resident_memory_bytes", ()) in after
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in server.log()
