"""How a replay is scored: abusive classes against a fixed external yardstick (chrony's
default ``ratelimit``: burst 8 + one per 8 s per source address), never against
guardntp's own settings; required, aspirational and reference targets; the live
replay's window and chronyd's configuration (no namespace needed here)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from guardntp.cli import main
from guardntp.filter.policy import FilterPolicy
from guardntp.replay import live
from guardntp.replay import report as reporting
from guardntp.replay.capture import make_capture
from guardntp.replay.inprocess import replay_in_process
from guardntp.replay.scenarios import ABUSIVE, LEGITIMATE, resolve_names
from guardntp.replay.sidecar import read_labels, read_meta, sidecar_paths
from guardntp.timestamps import NS_PER_S

POLICY = replace(FilterPolicy(), random_seed=7)
#: Every bucket wide open, the label ones included: a filter that serves every flood.
SERVE_EVERYTHING = [
    "filter.source_rate=1000", "filter.source_burst=100000",
    "filter.prefix_rate=100000", "filter.prefix_burst=1000000",
    "filter.labels.netgear-sntpv1-23457.rate=1000",
    "filter.labels.netgear-sntpv1-23457.burst=100000",
    "filter.labels.sntpv1.rate=1000", "filter.labels.sntpv1.burst=100000"]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 Netgear devices at 1/s for 120 s, and chrony clients."""
    out = tmp_path_factory.mktemp("scoring") / "mix.pcap"
    make_capture(resolve_names(["netgear-2003", "chrony"]), out, 3, 0.04, 120)
    return out


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_chronys_default_allowance() -> None:
    assert reporting.chrony_allowance(1, 0) == 1
    assert reporting.chrony_allowance(100, 0) == 8                   # the burst
    assert reporting.chrony_allowance(100, 80 * NS_PER_S) == 18      # + 1 per 8 s
    assert reporting.chrony_allowance(100, 80 * NS_PER_S - 1) == 17
    assert reporting.chrony_allowance(12, 800 * NS_PER_S) == 12      # never above requests
    # A device at 1/s for 121 requests (120 s): 8 + 15 allowed, 98 excess.
    assert reporting.score_excess([(121, 120 * NS_PER_S, 121)]) == (98, 98)
    assert reporting.score_excess([(121, 120 * NS_PER_S, 30)]) == (98, 7)
    assert reporting.score_excess([(121, 120 * NS_PER_S, 5)]) == (98, 0)
    # Per source: one source's unused allowance does not cover another's answers.
    assert reporting.score_excess([(121, 120 * NS_PER_S, 121), (121, 120 * NS_PER_S, 0)]) \
        == (196, 98)


def test_the_yardstick_does_not_move_with_our_settings(capture: Path) -> None:
    labels = read_labels(sidecar_paths(capture)[0])
    runs = [replay_in_process(capture, POLICY, labels),
            replay_in_process(capture, replace(POLICY, source_rate=1000.0, source_burst=100000,
                                               label_policies={}, prefix_rate=100000.0,
                                               prefix_burst=1000000), labels)]
    netgear = [next(g for g in run.groups if g.scenario == "netgear-2003") for run in runs]
    # The excess is a property of the capture: 20 devices x (121 - (8 + 15)).
    assert netgear[0].excess == netgear[1].excess == 20 * 98
    assert netgear[1].excess_served == netgear[1].excess          # all of it served
    assert netgear[0].suppressed_share is not None and netgear[0].suppressed_share > 0.75
    # Independently: the default label bucket (1/64 s, burst 2, no leak) serves
    # 2 + 120 / 64 = 3 a device, under chrony's 23: all of the excess suppressed.
    assert netgear[0].excess_served == 0
    # And with the old 1-in-4 leak, ~ 2 + 1 + 118 / 4 = 32 a device, 9 above chrony's 23.
    leaky = replay_in_process(capture, replace(POLICY, leak_one_in=4), labels)
    leaky_netgear = next(g for g in leaky.groups if g.scenario == "netgear-2003")
    assert leaky_netgear.excess == netgear[0].excess
    assert leaky_netgear.suppressed_share is not None
    assert 0.8 < leaky_netgear.suppressed_share < 0.95


def test_a_configuration_that_serves_every_flood_fails_check(
        capture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(capture), "--check", "-q"]) == 0
    default = capsys.readouterr().out
    assert "--check: every required target met" in default
    assert main(["replay", str(capture), "--check", "-q", *_sets(SERVE_EVERYTHING)]) == 1
    loose = capsys.readouterr().out
    line = next(t for t in loose.splitlines() if t.startswith("MISSED [")
                and "netgear-2003" in t and "floor" in t)
    assert "0.0% of 1960 excess suppressed, 1960 served" in line
    assert "--check: a required target is missed" in loose
    # Without --check the report is still written and the status is 0.
    assert main(["replay", str(capture), "--json", "-q", *_sets(SERVE_EVERYTHING)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["yardstick"]["burst"] == 8
    assert data["yardstick"]["interval_s"] == 8
    netgear = next(g for g in data["runs"][0]["groups"] if g["scenario"] == "netgear-2003")
    assert netgear["suppressed_share"] == 0.0


def test_every_abusive_class_gets_a_target_line_and_unscored_is_a_miss() -> None:
    scored = reporting.GroupResult("netgear-2003", ABUSIVE, requests=100, time=10,
                                   excess=80, excess_served=5)
    quiet = reporting.GroupResult("dlink-2005", ABUSIVE, requests=10, time=10, excess=0,
                                  excess_served=0)
    unscored = reporting.GroupResult("somewhere", ABUSIVE, requests=10, time=10)
    run = reporting.RunResult("r", "in-process", "guardntp", [scored, quiet, unscored])
    report = reporting.Report({}, [run])
    reporting.evaluate(report)
    by = {(t.subject.split()[0], t.name): t for t in report.targets}
    floor, target = reporting.CHRONY_FLOOR_NAME, reporting.ABUSIVE_TARGET_NAME
    assert by["netgear-2003", floor].ok                  # 75 of 80: 93.75 % >= 75 %
    assert not by["netgear-2003", target].ok             # but < 95 %
    assert "93.8% of 80 excess suppressed" in by["netgear-2003", target].detail
    assert by["dlink-2005", floor].ok and "no excess" in by["dlink-2005", floor].detail
    assert not by["somewhere", floor].ok and not by["somewhere", target].ok
    assert not report.ok


def test_aspirational_misses_are_reported_but_fail_only_strict_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The default filter meets every target today, so the list is empty; the mechanism
    # stays for the next known miss.
    assert not reporting.ASPIRATIONAL
    monkeypatch.setattr(reporting, "ASPIRATIONAL", frozenset({
        (reporting.ABUSIVE_TARGET_NAME, "mobatime-2009"),
        (reporting.CHRONY_FLOOR_NAME, "mobatime-2009")}))
    mobatime = reporting.GroupResult("mobatime-2009", ABUSIVE, requests=100, time=50,
                                     excess=90, excess_served=40)
    report = reporting.Report({}, [reporting.RunResult("r", "in-process", "guardntp",
                                                       [mobatime])])
    reporting.evaluate(report)
    missed = [t for t in report.targets if not t.ok]
    assert {t.kind for t in missed} == {"aspirational"} and len(missed) == 2
    assert report.ok and not report.strictly_ok
    text = reporting.render_text(report)
    assert "MISSED (ASPIRATIONAL)" in text and "55.6% of 90 excess suppressed" in text
    # The same figures for a scenario not on the list are a required miss.
    other = replace(mobatime, scenario="netgear-2003")
    report = reporting.Report({}, [reporting.RunResult("r", "in-process", "guardntp", [other])])
    reporting.evaluate(report)
    assert not report.ok


def test_the_chronyd_run_is_scored_the_same_way_but_never_enforced() -> None:
    group = reporting.GroupResult("netgear-2003", ABUSIVE, requests=100, time=90,
                                  excess=80, excess_served=75)
    run = reporting.RunResult("live chronyd", "live", "chronyd", [group])
    report = reporting.Report({}, [run])
    reporting.evaluate(report)
    assert {t.kind for t in report.targets} == {"reference"}
    assert not all(t.ok for t in report.targets) and report.ok and report.strictly_ok


def test_in_process_scores_the_live_window_only(capture: Path) -> None:
    labels = read_labels(sidecar_paths(capture)[0])
    window = live.window_packets(capture, None, 1.0, 30)
    total = read_meta(sidecar_paths(capture)[1])["packets"]
    assert 0 < window < total
    run = replay_in_process(capture, POLICY, labels, max_packets=window)
    assert run.window_packets == window == run.total().requests
    assert 29 <= run.window_s < 30
    assert live.window_packets(capture, 50.0, None, 4) == 200   # --rate 50 for 4 s
    # What the live parent counts from the capture over the same packets.
    sources, span_s = live.capture_sources(capture, labels, window)
    assert span_s == run.window_s
    assert sum(r[0] for by in sources.values() for r in by.values()) == window
    assert len(sources["netgear-2003"]) == 20


def test_live_chronyd_uses_chronys_default_ratelimit_unless_asked() -> None:
    def conf(which: str) -> list[str]:
        return live.CHRONY_CONF.format(port=123, dir="/x",
                                       ratelimit=live.CHRONY_RATELIMITS[which]).splitlines()

    assert "ratelimit" in conf("default")          # no options: interval 3 burst 8 leak 2
    assert not any(line.startswith("ratelimit ") for line in conf("default"))
    assert "ratelimit interval 1 burst 16 leak 2" in conf("guardntp")


def test_the_live_ruleset_counts_time_replies_per_abusive_source() -> None:
    scenarios = [{"name": "netgear-2003", "class": ABUSIVE, "networks": ["198.51.100.0/24"]},
                 {"name": "chrony", "class": "legitimate", "networks": ["10.1.0.0/16",
                                                                        "2001:db8:1::/48"]}]
    rules = live.nft_ruleset(scenarios, 4096).splitlines()
    assert any("set tsrc4" in r and "counter" in r and "size 4096" in r for r in rules)
    time_rules = [r for r in rules if "counter name time_" in r]
    assert [("add @tsrc" in r) for r in time_rules] == [True, False, False]
    assert "add @tsrc4 { ip daddr }" in time_rules[0]


# ---------------------------------------------------------------------- per-scenario targets

def _evaluated(*groups: reporting.GroupResult, server: str = "guardntp"
               ) -> tuple[dict[tuple[str, str], reporting.Target], reporting.Report]:
    run = reporting.RunResult(f"r {server}", "in-process" if server == "guardntp" else "live",
                              server, list(groups))
    report = reporting.Report({}, [run])
    reporting.evaluate(report)
    return {(t.subject.split()[0], t.name): t for t in report.targets}, report


def test_legitimate_classes_need_99_9_percent_and_the_spoofed_victims_95() -> None:
    legit, victims = reporting.LEGITIMATE_TARGET_NAME, reporting.SPOOFED_VICTIM_TARGET_NAME
    assert reporting.LEGITIMATE_TARGET == 0.999 and reporting.SPOOFED_VICTIM_TARGET == 0.95
    by, report = _evaluated(
        reporting.GroupResult("chrony", LEGITIMATE, requests=10_000, time=9_990),    # 99.90 %
        reporting.GroupResult("cgnat-800", LEGITIMATE, requests=10_000, time=9_989),  # 99.89 %
        reporting.GroupResult("ripe-atlas", LEGITIMATE, requests=1000, time=991),    # 99.1 %
        reporting.GroupResult("spoofed-victim", LEGITIMATE, requests=1000, time=950))
    assert by["chrony", legit].ok
    assert not by["cgnat-800", legit].ok and by["cgnat-800", legit].kind == "required"
    assert "99.89% of 10000 got time, 11 did not" in by["cgnat-800", legit].detail
    assert by["cgnat-800", legit].value == "99.89%"
    assert not by["ripe-atlas", legit].ok                # met the old 99 %, not 99.9 %
    # The victims of the spoofed flood are held to 95 % of their own requests, and only
    # to that: 95.0 % is met.
    assert by["spoofed-victim", victims].ok and ("spoofed-victim", legit) not in by
    assert not report.ok
    by, report = _evaluated(reporting.GroupResult("spoofed-victim", LEGITIMATE, requests=1000,
                                                  time=949))
    assert not by["spoofed-victim", victims].ok and by["spoofed-victim", victims].kind == "required"
    assert "94.9% of 1000 got time" in by["spoofed-victim", victims].detail and not report.ok
    # 96 % is fine for the victims, a miss for any other legitimate class.
    by, _ = _evaluated(reporting.GroupResult("spoofed-victim", LEGITIMATE, requests=100, time=96),
                       reporting.GroupResult("chrony", LEGITIMATE, requests=100, time=96))
    assert by["spoofed-victim", victims].ok and not by["chrony", legit].ok


def test_the_victim_spoofer_may_get_at_most_5_percent_answered_kods_included() -> None:
    name = reporting.VICTIM_SPOOFER_TARGET_NAME
    spoofer = reporting.GroupResult("victim-spoofer", ABUSIVE, requests=1000, time=30, kod=20,
                                    drop=950, excess=900, excess_served=0)
    by, report = _evaluated(spoofer)
    assert by["victim-spoofer", name].ok and report.ok      # 50 of 1000: exactly 5 %
    assert "5.0% of 1000 answered: 30 with time, 20 KoD" in by["victim-spoofer", name].detail
    # ... on top of the excess targets every abusive class gets.
    assert by["victim-spoofer", reporting.CHRONY_FLOOR_NAME].ok
    assert by["victim-spoofer", reporting.ABUSIVE_TARGET_NAME].ok
    # One KoD more is a required miss: a KoD lands on a victim too.
    by, report = _evaluated(replace(spoofer, kod=21, drop=949))
    assert not by["victim-spoofer", name].ok and by["victim-spoofer", name].kind == "required"
    assert by["victim-spoofer", name].value == "5.1%" and not report.ok
    # Other abusive classes are not held to it; the chronyd run only as a reference.
    by, _ = _evaluated(replace(spoofer, scenario="netgear-2003", time=500))
    assert ("netgear-2003", name) not in by
    by, report = _evaluated(replace(spoofer, time=500), server="chronyd")
    assert not by["victim-spoofer", name].ok and by["victim-spoofer", name].kind == "reference"
    assert report.ok


def test_the_kod_cost_per_device_in_the_text_and_json() -> None:
    deny = reporting.GroupResult("deny-loop", ABUSIVE, requests=1000, kod=300, drop=700,
                                 sources=40, bytes_in=48_000, bytes_out=14_400, excess=0,
                                 excess_served=0, reasons={"deny_kod": 300, "acl_deny": 700})
    quiet = reporting.GroupResult("chrony", LEGITIMATE, requests=10, time=10, sources=10,
                                  bytes_in=480, bytes_out=480)
    empty = reporting.GroupResult("w32time", LEGITIMATE)
    assert deny.kod_per_source == 7.5 and quiet.kod_per_source == 0.0
    assert empty.kod_per_source is None
    _, report = _evaluated(deny, quiet, empty)
    text = reporting.render_text(report).splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("KoD cost"))
    assert text[start + 1].split() == ["scenario", "class", "sources", "kod", "kod/src",
                                       "bytes", "out", "bytes", "in", "out/in"]
    assert text[start + 2].split() == ["deny-loop", "abusive", "40", "300", "7.50", "14400",
                                       "48000", "0.300"]
    assert text[start + 3].split() == ["chrony", "legitimate", "10", "0", "0.00", "480",
                                       "480", "1.000"]
    assert text[start + 4].split() == ["total", "all", "50", "300", "6.00", "14880", "48480",
                                       "0.307"]
    data = reporting.to_json(report)
    groups = {g["scenario"]: g for g in data["runs"][0]["groups"]}
    assert groups["deny-loop"]["kod_per_source"] == 7.5
    assert groups["deny-loop"]["reply_share"] == 0.3
    assert groups["w32time"]["kod_per_source"] is None
    assert data["runs"][0]["totals"]["all"]["kod_per_source"] == 6.0
    assert data["yardstick"]["legitimate_target"] == 0.999
    assert data["yardstick"]["scenario_targets"]["victim-spoofer"] == {"max_reply_share": 0.05}


def test_the_live_timeline_is_per_scenario() -> None:
    scenarios = [{"name": "netgear-2003", "class": ABUSIVE, "networks": ["198.51.100.0/24"]},
                 {"name": "ipv6-hosts", "class": LEGITIMATE, "networks": ["2001:db8:1::/48"]}]
    samples = [{"t": 0.5, "counters": {"in_0_4": [10, 760], "time_0_4": [4, 304],
                                       "kod_0_4": [1, 76], "in_1_6": [2, 192],
                                       "time_1_6": [2, 192]}},
               {"t": 1.5, "counters": {"in_0_4": [30, 2280], "time_0_4": [6, 456],
                                       "kod_0_4": [1, 76], "in_1_6": [3, 288],
                                       "time_1_6": [3, 288]}}]
    assert live._timeline(samples, scenarios) == {
        "netgear-2003": {"time": [4, 2], "kod": [1, 0], "drop": [5, 18]},
        "ipv6-hosts": {"time": [2, 1], "kod": [0, 0], "drop": [0, 0]}}
    assert live._timeline([], scenarios) == {
        "netgear-2003": {"time": [], "kod": [], "drop": []},
        "ipv6-hosts": {"time": [], "kod": [], "drop": []}}


def test_the_live_replay_says_when_two_scenarios_share_addresses() -> None:
    scenarios = [{"name": "spoofed-victim", "networks": ["192.0.2.0/25"]},
                 {"name": "victim-spoofer", "networks": ["192.0.2.0/24"]},
                 {"name": "chrony", "networks": ["10.1.0.0/16", "2001:db8:1::/48"]},
                 {"name": "ipv6-hosts", "networks": ["2001:db8:2::/48"]}]
    assert live.shared_blocks(scenarios) == [("spoofed-victim", "victim-spoofer")]


def test_live_scenarios_sharing_an_address_block_are_not_scored(capture: Path) -> None:
    """nftables counts replies by address block: two scenarios on one block (as
    spoofed-victim and victim-spoofer are) cannot be told apart live, so neither is
    scored there, rather than one getting the other's replies."""
    labels = read_labels(sidecar_paths(capture)[0])
    meta = read_meta(sidecar_paths(capture)[1])
    scenarios = [dict(s) for s in meta["scenarios"]]
    index = {s["name"]: i for i, s in enumerate(scenarios)}
    scenarios[index["chrony"]]["networks"] = (scenarios[index["netgear-2003"]]["networks"]
                                              + scenarios[index["chrony"]]["networks"])
    sent = meta["packets"]
    # What the block's rules would count: every request in on both rules, every reply
    # out on the first matching one (netgear's).
    counters = {f"in_{i}_4": [sent, sent * 76] for i in index.values()}
    counters[f"time_{index['netgear-2003']}_4"] = [sent, sent * 76]
    result = {"sent": sent, "wall_s": 120.0, "cpu_s": 1.0, "delivered": sent,
              "samples": [{"t": 0.5, "counters": counters}], "time_by_source": {}}
    run = live._to_run(result, capture, {**meta, "scenarios": scenarios}, labels, "guardntp",
                       None, 1.0, sent)
    groups = {g.scenario: g for g in run.groups}
    assert groups["chrony"].unscored == "shares its address block with netgear-2003"
    assert groups["netgear-2003"].unscored == "shares its address block with chrony"
    assert any("share address blocks" in note for note in run.notes)
    report = reporting.Report({}, [run])
    reporting.evaluate(report)
    assert report.targets == []                          # neither gets a (bogus) target
    rows = [line.split() for line in reporting.render_text(report).splitlines()]
    assert [row[6] for row in rows
            if row[:2] == ["chrony", "legitimate"] and len(row) == 10] == ["n/s"]
