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
from guardntp.replay.scenarios import ABUSIVE, resolve_names
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
    # Independently: the default label bucket (1/64 s, burst 2) plus a quarter leaked
    # serves ~ 2 + 1 + 118 / 4 = 32 a device, 9 above chrony's 23: ~ 90 % suppressed.
    assert 0.8 < netgear[0].suppressed_share < 0.95


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


def test_aspirational_misses_are_reported_but_fail_only_strict_check() -> None:
    assert (reporting.CHRONY_FLOOR_NAME, "mobatime-2009") in reporting.ASPIRATIONAL
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
