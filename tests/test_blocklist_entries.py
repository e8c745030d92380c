"""Blocklist values without I/O: durations, import files, exports, automatic blocking."""

from __future__ import annotations

import ipaddress

import pytest

from guardntp.blocklist.auto import (
    AutoBlocker,
    AutoPolicy,
    BadAutoSettings,
    network_of_key,
    parse_auto_policy,
)
from guardntp.blocklist.entries import (
    BadDuration,
    BadImportFile,
    BlockEntry,
    export_iptables,
    export_nft,
    export_plain,
    format_duration,
    format_table,
    nesting_levels,
    parse_duration,
    parse_import,
)
from guardntp.clock import ClockState
from guardntp.filter.acl import Action
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.filter.reference import DROPS, LAST_SEEN, new_record
from guardntp.responder import Responder
from guardntp.timestamps import NS_PER_S
from guardntp.wire import Mode, NtpPacket, encode

NOW = 1_800_000_000 * NS_PER_S


def entry(cidr: str, expires_in_s: int | None = None, action: str = "drop",
          origin: str = "manual", reason: str = "") -> BlockEntry:
    return BlockEntry(ipaddress.ip_network(cidr), action, reason, NOW,
                      None if expires_in_s is None else NOW + expires_in_s * NS_PER_S, origin)


# ---------------------------------------------------------------------------- durations

@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604_800), ("1w", 604_800),
    ("1h30m", 5400), (" 2H ", 7200), ("1d12h", 129_600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "", "h", "1.5h", "-5m", "0", "0s", "1h 30m", "m5",
                                  "99999w"])
def test_bad_durations_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(BadDuration, match="duration|zero|10 years"):
        parse_duration(text)


def test_format_duration_keeps_two_units() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(3599) == "59m59s"
    assert format_duration(90061) == "1d1h"
    assert format_duration(0) == "0s"


# ---------------------------------------------------------------------------- import files

def test_import_reads_comments_blanks_and_duplicates() -> None:
    text = "# feed\n\n192.0.2.0/24  # scanner\n198.51.100.7\n2001:db8::/32\n192.0.2.0/24\n"
    assert [str(n) for n in parse_import(text)] == [
        "192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32"]


def test_import_reports_every_bad_line_by_number() -> None:
    text = "192.0.2.0/24\n10.0.0.300\n# ok\n10.0.0.1/8\n198.51.100.0/24 extra\n::1\n"
    with pytest.raises(BadImportFile) as raised:
        parse_import(text)
    problems = raised.value.problems
    assert [number for number, _ in problems] == [2, 4, 5]
    assert "not an IPv4 or IPv6" in problems[0][1]
    assert "host bits" in problems[1][1] and "10.0.0.0/8" in problems[1][1]
    assert "one CIDR per line" in problems[2][1]


# ---------------------------------------------------------------------------- entries

def test_expiry_and_remaining_seconds_round_up() -> None:
    live = entry("192.0.2.0/24", 10)
    assert live.active(NOW) and not live.active(NOW + 10 * NS_PER_S)
    assert live.remaining_s(NOW + 1) == 10
    assert entry("192.0.2.0/24").remaining_s(NOW) is None
    acl = entry("192.0.2.0/24", 10, action="deny", origin="auto").acl_entry()
    assert acl.action is Action.DENY and acl.origin == "auto"
    assert acl.expires_ns == NOW + 10 * NS_PER_S


def test_table_has_a_row_per_entry_with_expiry_text() -> None:
    text = format_table([entry("192.0.2.0/24", 3600, reason="flood"), entry("2001:db8::/48")],
                        NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["CIDR", "ACTION", "ORIGIN", "EXPIRES", "CREATED", "REASON"]
    assert "in 1h" in lines[1] and lines[1].endswith("flood")
    assert "never" in lines[2] and lines[2] == lines[2].rstrip()


# ---------------------------------------------------------------------------- exports

def test_plain_export_round_trips_through_import() -> None:
    entries = [entry("192.0.2.0/24", 60, reason="a # b"), entry("2001:db8::/48"),
               entry("198.51.100.0/24", -1)]
    text = export_plain(entries, NOW)
    assert [str(n) for n in parse_import(text)] == ["192.0.2.0/24", "2001:db8::/48"]


def test_nft_export_has_sets_with_timeouts_and_drop_rules() -> None:
    text = export_nft([entry("192.0.2.0/24", 90), entry("198.51.100.7/32"),
                       entry("2001:db8::/48", 3600), entry("203.0.113.0/24", -5)], NOW, 123)
    assert "table inet guardntp {" in text
    assert "elements = { 192.0.2.0/24 timeout 90s, 198.51.100.7/32 }" in text
    assert "elements = { 2001:db8::/48 timeout 3600s }" in text
    assert "203.0.113.0" not in text  # expired: not exported
    assert "ip saddr @blocklist_v4 udp dport 123 counter drop" in text
    assert "ip6 saddr @blocklist_v6 udp dport 123 counter drop" in text
    assert text.count("flags interval, timeout") == 2


def test_nft_export_of_an_empty_list_still_has_both_sets() -> None:
    text = export_nft([], NOW, 4123)
    assert "elements" not in text and "udp dport 4123" in text
    assert "set blocklist_v4" in text and "set blocklist_v6" in text


def test_nesting_splits_overlaps_and_drops_what_is_covered() -> None:
    entries = [entry("10.0.0.0/8", 60), entry("10.1.0.0/16"), entry("10.1.2.0/24", 30),
               entry("10.2.0.0/16", 30), entry("192.0.2.0/24")]
    levels = nesting_levels(entries)
    # 10.2/16 lasts less than 10/8 that holds it: left out. 10.1/16 outlives 10/8: nested.
    # 10.1.2/24 is inside 10.1/16 (never expires): left out.
    assert [[e.cidr for e in level] for level in levels] == [
        ["10.0.0.0/8", "192.0.2.0/24"], ["10.1.0.0/16"]]
    text = export_nft(entries, NOW)
    assert "set blocklist_v4_nested1" in text
    assert "ip saddr @blocklist_v4_nested1 udp dport 123 counter drop" in text


def test_iptables_export_uses_ipset_timeouts() -> None:
    text = export_iptables([entry("192.0.2.0/24", 90), entry("2001:db8::/48")], NOW, 123)
    assert "ipset add guardntp-v4 192.0.2.0/24 timeout 90 -exist" in text
    assert "ipset add guardntp-v6 2001:db8::/48 timeout 0 -exist" in text
    assert "iptables -I INPUT -p udp --dport 123 -m set --match-set guardntp-v4 src -j DROP" \
        in text


# ---------------------------------------------------------------------------- auto settings

def test_auto_policy_defaults_off_and_parses() -> None:
    assert parse_auto_policy({}) == AutoPolicy()
    assert not AutoPolicy().enabled
    policy = parse_auto_policy({"auto": True, "auto_after": 30, "auto_ttl": "2h",
                                "auto_min_rate": 5, "auto_action": "deny"})
    assert policy == AutoPolicy(True, 30.0, 7200, 5.0, "deny")
    assert parse_auto_policy({"auto_ttl": 600}).ttl_s == 600


@pytest.mark.parametrize(("table", "key"), [
    ({"auto": "yes"}, "blocklist.auto"), ({"auto_after": 0}, "blocklist.auto_after"),
    ({"auto_ttl": "5x"}, "blocklist.auto_ttl"), ({"auto_min_rate": -1}, "auto_min_rate"),
    ({"auto_action": "kod"}, "auto_action"), ({"autoblock": True}, "blocklist.autoblock")])
def test_bad_auto_settings_name_their_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(BadAutoSettings, match=key):
        parse_auto_policy(table)


def test_network_of_key() -> None:
    assert str(network_of_key(bytes([192, 0, 2, 7]))) == "192.0.2.7/32"
    key = ipaddress.ip_address("2001:db8:1:2::5").packed[:8]
    assert str(network_of_key(key)) == "2001:db8:1:2::/64"


# ---------------------------------------------------------------------------- auto blocking

CLOCK = ClockState(synchronized=True, stratum=2, refid=b"\xc0\0\2\1", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=NOW)
REQUEST = encode(NtpPacket(version=4, mode=Mode.CLIENT, transmit_ts=0x1234, poll=6))


class Flood:
    """A real pipeline fed at fake times; ``run`` sends from each source at its rate."""

    def __init__(self) -> None:
        self.pipeline = Pipeline(FilterPolicy(random_seed=1, leak_one_in=0),
                                 Responder(CLOCK, NOW))
        self.now_ns = 10 * NS_PER_S

    def run(self, seconds: float, rates: dict[bytes, float], blocker: AutoBlocker,
            tick_s: float = 0.25) -> list[bytes]:
        due: list[bytes] = []
        next_send = dict.fromkeys(rates, self.now_ns)
        end = self.now_ns + int(seconds * NS_PER_S)
        while self.now_ns < end:
            tick_end = self.now_ns + int(tick_s * NS_PER_S)
            for source, rate in rates.items():
                while next_send[source] < tick_end:
                    self.pipeline.decide(REQUEST, source, 40000, NOW + next_send[source],
                                         next_send[source])
                    next_send[source] += int(NS_PER_S / rate)
            self.now_ns = tick_end
            due += [key for key, _ in blocker.scan(self.pipeline.sources.records, self.now_ns)]
        return due


FLOODER = bytes([198, 51, 100, 7])
NAT = bytes([192, 0, 2, 1])       # 40 clients at 64 s polls: 0.625/s against 0.5/s
POLITE = bytes([203, 0, 113, 9])


def test_a_flooder_is_due_after_the_threshold_and_not_before() -> None:
    flood = Flood()
    blocker = AutoBlocker(AutoPolicy(enabled=True, after_s=10, min_rate=1.0))
    rates = {FLOODER: 20.0, NAT: 0.625, POLITE: 1 / 64}
    assert flood.run(9, rates, blocker) == []
    assert FLOODER in blocker.suspects
    due = flood.run(5, rates, blocker)
    assert due == [FLOODER]
    assert FLOODER not in blocker.suspects
    assert POLITE not in blocker.suspects
    # The NAT is watched (it is limited now and then) but never reaches min_rate.
    assert NAT not in flood.run(30, {NAT: 0.625}, blocker)


def test_a_source_that_calms_down_is_forgotten() -> None:
    flood = Flood()
    blocker = AutoBlocker(AutoPolicy(enabled=True, after_s=20, min_rate=1.0))
    flood.run(11, {FLOODER: 20.0}, blocker)  # one look every 5 s (a quarter of after_s)
    assert FLOODER in blocker.suspects
    flood.run(20, {POLITE: 1 / 64}, blocker)   # the flooder stops sending
    assert FLOODER not in blocker.suspects
    assert flood.run(30, {POLITE: 1 / 64}, blocker) == []


def test_a_source_named_in_the_access_list_is_never_due() -> None:
    from guardntp.filter.acl import AclEntry

    flood = Flood()
    flood.pipeline.set_blocklist([AclEntry(ipaddress.ip_network("198.51.100.0/24"),
                                           Action.ALLOW, "manual")])
    blocker = AutoBlocker(AutoPolicy(enabled=True, after_s=2, min_rate=1.0))
    assert flood.run(10, {FLOODER: 20.0}, blocker) == []


def test_scan_is_bounded_per_call() -> None:
    flood = Flood()
    blocker = AutoBlocker(AutoPolicy(enabled=True, after_s=1, min_rate=0.1))
    records: dict[bytes, list[object]] = {}
    for i in range(1000):
        record = new_record(0, "x", 1)
        record[DROPS] = 1
        record[LAST_SEEN] = flood.now_ns
        records[bytes([10, 0, i // 256, i % 256])] = record
    blocker.scan(records, flood.now_ns, budget=100)
    assert len(blocker.suspects) == 100
    blocker.scan(records, flood.now_ns, budget=100)
    assert len(blocker.suspects) == 200
