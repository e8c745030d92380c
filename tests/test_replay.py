"""The flood replay harness: scenarios, captures, in-process replay and its targets, CLI, live.

In-process replays are deterministic (virtual time, seeded leak), so the replay
targets are checked here on scaled-down mixes (their scoring: test_replay_scoring.py);
the live replay runs only as root with tcpreplay and nftables, inside a private network
namespace, for a few seconds.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import needs_netns

from guardntp import fastlane
from guardntp.cli import main
from guardntp.filter.policy import FilterPolicy
from guardntp.replay import report as reporting
from guardntp.replay.capture import make_capture
from guardntp.replay.inprocess import replay_in_process
from guardntp.replay.pcap import PcapWriter, parse_udp, read_frames
from guardntp.replay.scenarios import (
    ABUSIVE,
    LEGITIMATE,
    MIXES,
    SCENARIOS,
    Kind,
    mix_events,
    resolve_names,
)
from guardntp.replay.sidecar import read_labels, read_meta, sidecar_paths
from guardntp.timestamps import NS_PER_S

POLICY = replace(FilterPolicy(), random_seed=7)


def _capture(tmp_path: Path, names: list[str], scale: float, duration_s: float,
             seed: int = 1, name: str = "mix.pcap") -> Path:
    out = tmp_path / name
    make_capture(resolve_names(names), out, seed, scale, duration_s)
    return out


def _replay(capture: Path, policy: FilterPolicy = POLICY) -> reporting.Report:
    run = replay_in_process(capture, policy, read_labels(sidecar_paths(capture)[0]))
    report = reporting.Report({"path": str(capture)}, [run])
    reporting.evaluate(report)
    return report


def _groups(report: reporting.Report) -> dict[str, reporting.GroupResult]:
    return {group.scenario: group for group in report.runs[0].groups}


# ---------------------------------------------------------------------- scenarios

def test_scenario_address_blocks_are_disjoint_and_never_global() -> None:
    networks = [(name, ipaddress.ip_network(cidr)) for name, s in SCENARIOS.items()
                for cidr in s.networks]
    for name, network in networks:
        assert not network.is_global, f"{name}: {network} is globally routable"
    # The one exception, on purpose: a flood in the victims' names shares their block.
    shared = {"spoofed-victim", "victim-spoofer"}
    overlapping = set()
    for index, (name, network) in enumerate(networks):
        for other, second in networks[index + 1:]:
            if network.version == second.version and network.overlaps(second):
                assert {name, other} == shared, f"{name} {network} overlaps {other}"
                overlapping.add((name, other))
    assert overlapping == {("spoofed-victim", "victim-spoofer")}


def test_events_are_ordered_inside_the_window_and_inside_their_blocks() -> None:
    duration_ns = 120 * NS_PER_S
    names = list(SCENARIOS)
    events = list(mix_events(names, 3, 0.05, duration_ns))
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert all(0 <= e[0] < duration_ns for e in events)
    seen = set()
    for _, tag, _, _, src, _, ttl in events:
        assert 1 <= ttl <= 255
        address = ipaddress.ip_address(src)
        assert any(address in ipaddress.ip_network(c) for c in SCENARIOS[names[tag]].networks)
        seen.add(names[tag])
    # top-of-hour fires at minute 0 (60 s in); w32time polls hours apart, so it may be silent.
    assert seen >= set(names) - {"w32time"}


def test_scenarios_are_seeded() -> None:
    def run(seed: int) -> list[tuple[object, ...]]:
        return list(mix_events(["chrony", "spoofed-random"], seed, 0.1, 30 * NS_PER_S))

    assert run(5) == run(5)
    assert run(5) != run(6)
    # Adding a scenario leaves another's packets unchanged.
    alone = [e[2:] for e in mix_events(["netgear-2003"], 5, 0.02, 10 * NS_PER_S)]
    mixed = [e[2:] for e in mix_events(["chrony", "netgear-2003"], 5, 0.02, 10 * NS_PER_S)
             if e[1] == 1]
    assert alone == mixed


def test_scenario_shapes_follow_the_incident_reports() -> None:
    duration_ns = 60 * NS_PER_S
    netgear = list(mix_events(["netgear-2003"], 1, 0.02, duration_ns))   # 10 devices
    assert {e[5] for e in netgear} == {23457}
    assert 590 <= len(netgear) <= 610                                     # 1/s each
    probes = list(mix_events(["reflection-probes"], 1, 1, duration_ns))
    assert {e[3] for e in probes} == {Kind.MODE6_READVAR, Kind.MODE7_MONLIST, Kind.NTPV4}
    assert {e[5] for e in probes if e[3] == Kind.NTPV4} == {0, 19, 53}
    cgnat = list(mix_events(["cgnat"], 1, 0.25, 3600 * NS_PER_S))        # one address
    assert len({e[4] for e in cgnat}) == 1 and len({e[2] for e in cgnat}) >= 150
    assert set(resolve_names(["floods", "normal"])) == set(SCENARIOS)
    assert all(SCENARIOS[n].klass == ABUSIVE for n in MIXES["floods"])
    with pytest.raises(ValueError, match="unknown scenario"):
        resolve_names(["nope"])


# ---------------------------------------------------------------------- captures

def test_capture_is_a_standard_pcap_with_valid_checksums_and_labels(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    capture = _capture(tmp_path, ["all"], 0.02, 90)
    labels_path, meta_path = sidecar_paths(capture)
    meta = read_meta(meta_path)
    labels = read_labels(labels_path)
    packets = rdpcap(str(capture))
    assert len(packets) == meta["packets"] == len(labels.group_of_packet) > 500
    assert sum(s["packets"] for s in meta["scenarios"]) == meta["packets"]
    klass = {s.name: s.klass for s in SCENARIOS.values()}
    families = set()
    for index, packet in enumerate(packets):
        scenario, label_class = labels.groups[labels.group_of_packet[index]]
        assert klass[scenario] == label_class
        assert packet[Ether].src == packet[Ether].dst == "00:00:00:00:00:00"
        assert packet[UDP].dport == 123
        network = packet[IP] if IP in packet else packet[IPv6]
        assert network.dst in ("127.0.0.1", "::1")
        families.add(network.version)
        if index % 7 and IPv6 not in packet:
            continue  # checksums: every IPv6 packet and every 7th IPv4 one (time)
        rebuilt = packet.copy()
        if IP in rebuilt:
            del rebuilt[IP].chksum
        del rebuilt[UDP].chksum
        assert bytes(Ether(bytes(rebuilt))) == bytes(packet), f"bad checksum in packet {index}"
    assert families == {4, 6}


def test_a_capture_of_200k_packets(tmp_path: Path) -> None:
    # How fast it is made is measured in bench/, not asserted here (a busy machine).
    capture = _capture(tmp_path, ["netgear-2003", "spoofed-random"], 1, 200)
    packets = read_meta(sidecar_paths(capture)[1])["packets"]
    assert packets > 190_000
    # The file holds every packet the sidecar counts.
    frames = sum(1 for _ in read_frames(str(capture)))
    assert frames == packets


def test_pcap_reader_accepts_foreign_captures_and_skips_what_is_not_ntp(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    path = tmp_path / "foreign.pcap"
    request = bytes([0x23]) + bytes(47)
    mac = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
    frames = [Ether(**mac) / IP(src="192.0.2.1", dst="192.0.2.9") / UDP(sport=40000, dport=123)
              / Raw(request),
              Ether(**mac) / IP(src="192.0.2.1", dst="192.0.2.9") / TCP(sport=1, dport=123),
              Ether(**mac) / IP(src="192.0.2.9", dst="192.0.2.1") / UDP(sport=123, dport=40000)
              / Raw(request)]
    with open(path, "wb") as file:
        writer = PcapWriter(file)
        for index, frame in enumerate(frames):
            writer.write(NS_PER_S * (1000 + index), bytes(frame))
        writer.flush()
    assert [parse_udp(f) is not None for _, f in read_frames(str(path))] == [True, False, True]
    run = replay_in_process(path, POLICY, None)
    assert [(g.scenario, g.klass, g.requests, g.time) for g in run.groups] == \
        [("capture", "unlabelled", 1, 1)]
    assert "2 packets were not UDP to port 123" in run.notes[0]


# ---------------------------------------------------------------------- targets (in-process)

def test_every_mix_meets_the_targets(tmp_path: Path) -> None:
    """Floods and normal clients together: every required target met (legitimate >= 99.9 %,
    spoofed-victim >= 95 %, abusive excess over chrony's default allowance suppressed,
    victim-spoofer <= 5 % answered, no amplification), and the independent figures below
    agree with the report."""
    duration_s = 300
    capture = _capture(tmp_path, ["all"], 0.2, duration_s)
    report = _replay(capture)
    failed = [t for t in report.targets if not t.ok and t.kind == "required"]
    assert not failed and report.ok, reporting.render_text(report)
    groups = _groups(report)
    for group in groups.values():
        assert group.requests == group.time + group.kod + group.drop
        assert group.bytes_out <= group.bytes_in
        if group.klass == LEGITIMATE:
            wanted = reporting.SPOOFED_VICTIM_TARGET if group.scenario == "spoofed-victim" \
                else 0.999
            assert group.time >= wanted * group.requests, group
    # Netgear: 100 devices at 1/s, each held to its label's bucket (1/64 s, burst 2), no
    # leak: computed here from the scenario, not by the report.
    netgear = groups["netgear-2003"]
    devices = netgear.sources
    allowed = devices * (2 + duration_s // 64)
    assert devices == 100 and netgear.requests >= 100 * (duration_s - 1)
    assert allowed <= netgear.time <= allowed + devices  # (+1 each: where a refill lands)
    # A RATE KoD in SNTPv1's own version, at most one a device per 16 s guard time.
    assert devices * (duration_s // 16 - 2) <= netgear.kod <= devices * (duration_s // 16 + 1)
    # Reflection probes get nothing at all.
    probes = groups["reflection-probes"]
    assert probes.requests > 1000 and probes.time == probes.kod == probes.bytes_out == 0
    # Mobatime's 15 hosts at 1.85/s each are cut to about a third.
    assert groups["mobatime-2009"].time_share < 0.5


def test_replay_is_deterministic(tmp_path: Path) -> None:
    capture = _capture(tmp_path, ["floods"], 0.05, 60)
    first, second = (reporting.to_json(_replay(capture)) for _ in range(2))
    for data in (first, second):
        for run in data["runs"]:
            run["wall_s"] = 0
    assert first == second


@pytest.mark.skipif(not fastlane.available(), reason="the compiled loop is not built")
def test_the_compiled_replay_decides_as_pipeline_decide(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay runs the shipped compiled decision; with it taken away, Pipeline.decide
    alone must give the same report, packet counts, tables and timelines."""
    capture = _capture(tmp_path, ["floods", "spoofed-random", "chrony", "ipv6-hosts"], 0.2, 90)
    policy = replace(POLICY, max_sources=3000, max_prefixes=2000, max_newcomers=4000)
    compiled = reporting.to_json(_replay(capture, policy))
    monkeypatch.setattr(fastlane, "available", lambda sock=None: False)
    python = reporting.to_json(_replay(capture, policy))
    in_c = re.search(r"(\d+) time replies and (\d+) first sightings in C",
                     compiled["runs"][0]["notes"][-1])
    assert in_c and int(in_c[1]) > 1000 and int(in_c[2]) > 1000
    assert "Pipeline.decide" in python["runs"][0]["notes"][-1]
    for data in (compiled, python):
        for run in data["runs"]:
            run["wall_s"] = 0
            run["notes"] = run["notes"][:-1]
    assert compiled == python


def test_spoofed_sources_keep_the_tables_under_their_cap(tmp_path: Path) -> None:
    capture = _capture(tmp_path, ["spoofed-random", "chrony", "cgnat"], 1, 120)
    policy = replace(POLICY, max_sources=2000, max_prefixes=5000)
    report = _replay(capture, policy)
    tables = report.runs[0].tables
    assert tables["peak_sources"] == 2000 and tables["peak_prefixes"] == 5000  # cap reached
    # Once the source table is full, one-packet spoofed sources churn only the newcomer ring.
    assert tables["newcomers_at_end"] <= tables["max_newcomers"]
    assert tables["newcomers_at_end"] > 50_000
    assert not [t for t in report.targets if not t.ok], reporting.render_text(report)
    assert _groups(report)["spoofed-random"].sources > 55_000


def test_the_timeline_is_per_scenario_and_sums_to_its_counts(tmp_path: Path) -> None:
    capture = _capture(tmp_path, ["netgear-2003", "mobatime-2009", "chrony", "cgnat"], 0.05, 90)
    run = _replay(capture).runs[0]
    assert set(run.timeline) == {g.scenario for g in run.groups}
    lengths = {len(series) for by in run.timeline.values() for series in by.values()}
    assert lengths == {int(run.replay_s)} and 89 <= run.replay_s <= 90
    for group in run.groups:
        by_verdict = run.timeline[group.scenario]
        assert set(by_verdict) == set(reporting.VERDICTS)
        assert [sum(by_verdict[v]) for v in reporting.VERDICTS] == \
            [group.time, group.kod, group.drop], group.scenario
    # Netgear's 25 devices at 1/s (the scenario's 500 at scale 0.05): 25 every second.
    netgear = run.timeline["netgear-2003"]
    per_second = [sum(counts) for counts in zip(*netgear.values(), strict=True)]
    assert min(per_second[1:-1]) >= 24 and max(per_second) <= 26
    # Per class: the sums of its scenarios, second by second.
    by_class = run.class_timeline()
    assert set(by_class) == {ABUSIVE, LEGITIMATE}
    for verdict in reporting.VERDICTS:
        assert by_class[ABUSIVE][verdict] == [
            a + b for a, b in zip(run.timeline["netgear-2003"][verdict],
                                  run.timeline["mobatime-2009"][verdict], strict=True)]
    assert reporting.to_json(reporting.Report({}, [run]))["runs"][0]["timeline_by_class"] \
        == by_class


def test_a_reply_larger_than_its_request_fails_the_bytes_target() -> None:
    group = reporting.GroupResult("x", ABUSIVE, requests=1, time=1, bytes_in=48, bytes_out=68,
                                  excess=0, excess_served=0)
    report = reporting.Report({}, [reporting.RunResult("r", "in-process", "guardntp", [group])])
    reporting.evaluate(report)
    failed = [t for t in report.targets if not t.ok]
    assert not report.ok and [t.name for t in failed] == ["bytes out <= bytes in"]


# ---------------------------------------------------------------------- CLI

def test_cli_makes_a_capture_and_writes_the_report(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    capture = tmp_path / "cli.pcap"
    assert main(["capture", "make", "netgear-2003", "chrony", "-o", str(capture),
                 "--scale", "0.05", "--duration", "60", "--seed", "9", "-q"]) == 0
    assert "packets" in capsys.readouterr().out
    report_dir = tmp_path / "report"
    assert main(["replay", str(capture), "--report-dir", str(report_dir), "--check",
                 "-q"]) == 0
    text = capsys.readouterr().out
    assert "netgear-2003" in text and "in-process guardntp" in text
    data = json.loads((report_dir / "report.json").read_text())
    netgear = next(g for g in data["runs"][0]["groups"] if g["scenario"] == "netgear-2003")
    assert netgear["requests"] == netgear["time"] + netgear["kod"] + netgear["drop"] > 1000
    assert data["capture"]["seed"] == 9 and data["ok"] is True
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report_dir / "report.txt").read_text() == text
    # --set reaches the filter: the old 1-in-4 leak answers far more.
    assert main(["replay", str(capture), "--json", "-q", "--set", "filter.leak_one_in=4"]) == 0
    leaky = json.loads(capsys.readouterr().out)
    leaky_netgear = next(g for g in leaky["runs"][0]["groups"] if g["scenario"] == "netgear-2003")
    assert leaky_netgear["time"] > netgear["time"] * 5


def test_the_plot_draws_zero_series_values_and_every_target(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # installed with .[tools] / .[dev]
    chrony = reporting.GroupResult("chrony", LEGITIMATE, requests=100, time=100, sources=5,
                                   bytes_in=4800, bytes_out=4800)
    victims = reporting.GroupResult("spoofed-victim", LEGITIMATE, requests=100, time=93, drop=7,
                                    sources=5, bytes_in=4800, bytes_out=4464)
    spoofer = reporting.GroupResult("victim-spoofer", ABUSIVE, requests=1000, time=1, drop=999,
                                    sources=5, bytes_in=48000, bytes_out=48, excess=900,
                                    excess_served=0)
    silent = reporting.GroupResult("deny-loop", ABUSIVE)          # no requests, no timeline
    run = reporting.RunResult(
        "in-process guardntp", "in-process", "guardntp", [chrony, victims, spoofer, silent],
        timeline={"chrony": {"time": [60, 40], "kod": [0, 0], "drop": [0, 0]},
                  "spoofed-victim": {"time": [50, 43], "kod": [0, 0], "drop": [3, 4]},
                  "victim-spoofer": {"time": [1, 0], "kod": [0, 0], "drop": [499, 500]}})
    report = reporting.Report({"path": "x.pcap"}, [run])
    reporting.evaluate(report)
    figure = reporting.plot_figure(report)
    try:
        axes = {axis.get_title(): axis for axis in figure.axes}
        legends = {title: [text.get_text() for text in axis.get_legend().get_texts()]
                   for title, axis in axes.items() if axis.get_legend() is not None}
        # Every series is in its panel's legend with its total, the all-zero ones too.
        assert legends["chrony (legitimate)"] == ["answered 100", "KoD 0", "no reply 0"]
        assert legends["deny-loop (abusive)"] == ["answered 0", "KoD 0", "no reply 0"]
        assert legends["victim-spoofer (abusive)"] == ["answered 1", "KoD 0", "no reply 999"]
        # Value labels on the bars; a log axis (0 included) for the shares answered.
        answered = next(axis for title, axis in axes.items() if title.startswith("share of"))
        assert [text.get_text() for text in answered.texts] == ["100%", "93.0%", "0.10%", "-"]
        assert answered.get_yscale() == "symlog"
        assert {"0.1%", "100%"} <= {t.get_text() for t in answered.get_yticklabels()}
        # Every target in the table, met or missed.
        cells = [cell.get_text().get_text() for axis in figure.axes for table in axis.tables
                 for cell in table.get_celld().values()]
        assert "\u2717 93.0%" in cells and "\u2713 0.10%" in cells and "\u2713 100%" in cells
        marks = [c for c in cells if c[:1] in ("\u2713", "\u2717")]
        assert len(marks) == len(report.targets)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    paths = reporting.write_report(report, tmp_path / "report")
    assert paths[2].name == "report.png" and paths[2].read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.png"                        # a report with nothing in it
    reporting.render_plot(reporting.Report({}), empty)
    assert empty.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["capture", "make", "nope", "-o", "{tmp}/x.pcap"], "unknown scenario 'nope'"),
    (["capture", "make", "chrony", "-o", "{tmp}/x.pcap", "--scale", "0"], "--scale"),
    (["capture", "make", "chrony", "-o", "{tmp}/x.pcap", "--duration", "-1"], "--duration"),
    (["capture", "make", "chrony", "-o", "{tmp}/no/such/dir/x.pcap"], "no such directory"),
    (["replay", "{tmp}/missing.pcap"], "no such file"),
    (["replay", "{tmp}/text.pcap"], "not a classic pcap file"),
    (["replay", "{tmp}/short.pcap"], "fewer packets than its labels file"),
    (["replay", "{tmp}/short.pcap", "--set", "filter.source_rate=x"], "source_rate"),
    (["replay", "{tmp}/short.pcap", "--rate", "-5"], "--rate must be positive"),
    (["replay", "{tmp}/short.pcap", "--live", "--rate", "inf"], "--rate must be a finite"),
    (["replay", "{tmp}/short.pcap", "--live", "--speed", "inf"], "--speed must be a finite"),
    (["replay", "{tmp}"], "is a directory, not a pcap file"),
    (["replay", ""], "the capture file name is empty"),
])
def test_cli_rejects_bad_input_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    (tmp_path / "text.pcap").write_text("hello, this is not a capture\n")
    short = _capture(tmp_path, ["chrony"], 0.01, 600, name="short.pcap")
    labels = sidecar_paths(short)[0]
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines + [f"{len(lines) - 1},chrony,legitimate,0"]) + "\n")
    status = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    error = capsys.readouterr().err.strip().splitlines()
    assert status in (1, 2)
    assert error and message in error[-1] and "Traceback" not in "\n".join(error)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", "abc", "seed must be a whole number >= 0, not 'abc'"),
    ("seed", None, "seed must be a whole number >= 0, not None"),
    ("packets", "many", "packets must be a whole number >= 0, not 'many'"),
    ("duration_s", [1], "duration_s must be a finite number >= 0, not [1]"),
    ("scenarios", "xyz", "scenarios must be a list"),
    ("scenarios", [1, 2], 'scenarios[0] must be an object with a "name" and a "class"'),
    ("scenarios", [{"name": "chrony", "class": "legitimate", "networks": ["10.0.0.1/8"]}],
     "scenarios[0].networks: '10.0.0.1/8' is not a CIDR"),
])
def test_a_meta_file_with_wrong_types_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object,
        message: str) -> None:
    capture = _capture(tmp_path, ["chrony"], 0.01, 60)
    meta_path = sidecar_paths(capture)[1]
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["replay", str(capture), "-q", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert err == f"guardntp: {meta_path}: {message}\n"


def test_labels_must_match_the_capture(tmp_path: Path) -> None:
    capture = _capture(tmp_path, ["chrony"], 0.01, 600)
    labels = sidecar_paths(capture)[0]
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")
    assert main(["replay", str(capture), "-q"]) == 1
    labels.write_text("\n".join([lines[0], "7,chrony,legitimate,0"]) + "\n")
    assert main(["replay", str(capture), "-q"]) == 1


# ---------------------------------------------------------------------- live

needs_live_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("tcpreplay", "nft", "ip")),
    reason="needs tcpreplay, nftables and iproute2 (Debian: tcpreplay nftables iproute2)")


@pytest.mark.netns
@pytest.mark.slow
@needs_netns
@needs_live_tools
def test_live_replay_against_guardntp_counts_replies_on_the_wire(tmp_path: Path) -> None:
    from guardntp.replay.live import replay_live

    capture = _capture(tmp_path, ["netgear-2003", "reflection-probes", "ipv6-hosts"], 2, 4)
    meta = read_meta(sidecar_paths(capture)[1])
    labels = read_labels(sidecar_paths(capture)[0])
    run = replay_live(capture, meta, labels, "guardntp", None, 1.0, 15, [])
    groups = {g.scenario: g for g in run.groups}
    assert run.delivered == meta["packets"]  # every spoofed packet reached the server's host
    netgear = groups["netgear-2003"]
    assert netgear.requests > 3900 and netgear.sources == 1000  # counted from the capture
    # 1000 devices x 4 requests in 4 s: the label's burst of 2 each, then one RATE KoD
    # each (the guard time is 16 s), the rest dropped.
    assert 2000 <= netgear.time <= 2000 + 50
    assert 900 <= netgear.kod <= 1000
    # 4 requests a device in 4 s: all within chrony's default allowance (burst 8).
    assert netgear.excess == netgear.excess_served == 0
    assert run.window_packets == meta["packets"] and 3 <= run.window_s <= 4
    probes = groups["reflection-probes"]
    assert probes.requests > 0 and probes.time == probes.kod == probes.bytes_out == 0
    for group in run.groups:
        assert group.bytes_out <= group.bytes_in
    ipv6 = groups["ipv6-hosts"]
    assert ipv6.requests > 0 and ipv6.time == ipv6.requests  # IPv6 replies are counted too
    assert run.cpu_s is not None and run.cpu_s > 0
    for group in run.groups:  # the timeline is per scenario
        assert sum(run.timeline[group.scenario]["time"]) == group.time, group.scenario
    assert sum(sum(by["time"]) for by in run.class_timeline().values()) == \
        sum(g.time for g in run.groups)


def test_pcap_writer_writes_the_classic_header(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    with open(path, "wb") as file:
        PcapWriter(file).flush()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", path.read_bytes())
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 1)
    assert list(read_frames(str(path))) == []
