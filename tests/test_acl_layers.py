"""The access list's two layers (configuration, blocklist) and blocklist changes by difference.

Issue 13, item 8: a blocklist entry on the CIDR of a ``[[acl]]`` entry used to
replace it, so that when the blocklist entry expired the configuration's was
gone too (a config-dropped /24 was answered the moment a TTL on it ran out);
and every ``block add`` rebuilt the whole table (0.6-0.7 s among 100 000 entries).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardntp import fastlane
from guardntp.blocklist.auto import parse_auto_policy
from guardntp.blocklist.entries import BlockEntry
from guardntp.blocklist.live import setup_blocklist
from guardntp.blocklist.store import BlockStore
from guardntp.clock import ClockState
from guardntp.filter import acl as acl_module
from guardntp.filter.acl import AccessList, AclEntry, Action, Match, Network, longest_match
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.responder import Responder
from guardntp.timestamps import NS_PER_S
from guardntp.verdicts import Reason

WALL = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=WALL)
REQUEST = bytes((0x23, 0, 6)) + bytes(45)
NET = ipaddress.ip_network
SLASH24 = NET("192.0.2.0/24")


# ------------------------------------------------------------------ the oracle

class Model:
    """The two layers as plain dicts by network, and lookup by brute force."""

    def __init__(self) -> None:
        self.config: dict[Network, AclEntry] = {}
        self.blocklist: dict[Network, AclEntry] = {}

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
               now_ns: int) -> AclEntry | None:
        best: tuple[int, int] | None = None
        found = None
        for rank, layer in ((0, self.config), (1, self.blocklist)):
            for network, entry in layer.items():
                if (network.version == address.version and address in network
                        and entry.active(now_ns)
                        and (best is None or (network.prefixlen, rank) > best)):
                    best, found = (network.prefixlen, rank), entry
        return found


#: A small universe, so that prefixes nest and the layers meet on the same CIDR.
V4_LENGTHS = (0, 8, 16, 20, 23, 24, 25, 30, 32)
V6_LENGTHS = (0, 32, 48, 56, 64, 96, 127, 128)


@st.composite
def networks(draw: st.DrawFn) -> Network:
    if draw(st.booleans()):
        prefixlen = draw(st.sampled_from(V4_LENGTHS))
        address = (10 << 24) | draw(st.integers(0, 3)) << 16 | draw(st.integers(0, 3)) << 8 \
            | draw(st.sampled_from((0, 1, 2, 255)))
        return ipaddress.IPv4Network((address, prefixlen), strict=False)
    prefixlen = draw(st.sampled_from(V6_LENGTHS))
    address = (0x2001_0DB8 << 96) | draw(st.integers(0, 3)) << 64 | draw(st.integers(0, 3))
    return ipaddress.IPv6Network((address, prefixlen), strict=False)


@st.composite
def entries(draw: st.DrawFn, origin: str) -> AclEntry:
    # (and expiries beyond 64 bits, far in the future or the past)
    expires = draw(st.one_of(st.none(), st.integers(0, 100), st.sampled_from((1 << 70,
                                                                              -(1 << 70)))))
    return AclEntry(draw(networks()), draw(st.sampled_from(list(Action))), origin,
                    draw(st.text("abc", max_size=2)), expires)


@st.composite
def addresses(draw: st.DrawFn, among: list[Network]) -> bytes:
    """Often an address inside one of the networks in play, else anywhere nearby."""
    if among and draw(st.booleans()):
        network = draw(st.sampled_from(among))
        host = draw(st.integers(0, network.num_addresses - 1))
        return (network.network_address + host).packed
    if draw(st.booleans()):
        return ((10 << 24) | draw(st.integers(0, 1 << 18))).to_bytes(4, "big")
    return ((0x2001_0DB8 << 96) | draw(st.integers(0, 1 << 66))).to_bytes(16, "big")


def said(found: Match | None) -> tuple[object, ...] | None:
    """What an entry or a verdict says, and of which layer (a blocklist entry is found
    as its shared verdict)."""
    if found is None:
        return None
    return (isinstance(found, AclEntry), found.action, found.origin, found.reason,
            found.expires_ns)


def expected_of(entry: AclEntry | None, model: Model) -> tuple[object, ...] | None:
    if entry is None:
        return None
    config = any(entry is e for e in model.config.values())
    return (config, entry.action, entry.origin, entry.reason, entry.expires_ns)


def check(acl: AccessList, model: Model, probes: list[tuple[bytes, int]]) -> None:
    """The list's lookup (compiled where built) and the reference model's, over the
    same tables, against the brute-force oracle: the configuration's own entry, or
    the verdict of the blocklist's."""
    for packed, now_ns in probes:
        entry = model.lookup(ipaddress.ip_address(packed), now_ns)
        expected = expected_of(entry, model)
        found = acl.lookup(packed, now_ns)
        assert said(found) == expected, (packed.hex(), now_ns)
        if expected is not None and expected[0]:
            assert found is entry
        reference = longest_match(acl.probes(len(packed)), acl.block_table, packed, now_ns)
        assert reference is found
    assert len(acl) == len(model.config) + len(model.blocklist)
    assert acl.covers_ipv6() == any(n.version == 6 for n in [*model.config, *model.blocklist])
    assert sorted(map(id, acl.config_entries())) == sorted(map(id, model.config.values()))
    assert sorted(acl.blocklist_entries(), key=repr) == sorted(model.blocklist.values(),
                                                                key=repr)
    assert len(acl.entries()) == len(model.config) + len(model.blocklist)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_lookup_matches_a_brute_force_oracle_through_any_sequence_of_changes(
        data: st.DataObject) -> None:
    """Longest prefix wins; on one prefix the blocklist; an expired entry uncovers the
    configuration's on the same prefix, else a shorter prefix: the compiled lookup and
    its reference model both, as the oracle finds it. Built at once or changed
    entry by entry (update_blocklist, set_blocklist, a new configuration), lookups are
    the oracle's, and the generation moves whenever a layer changed."""
    model = Model()
    config = data.draw(st.lists(entries("config"), max_size=8))
    blocklist = data.draw(st.lists(entries("manual"), max_size=8))
    acl = AccessList(config, blocklist)
    model.config = {entry.network: entry for entry in config}
    model.blocklist = {entry.network: entry for entry in blocklist}
    for _ in range(data.draw(st.integers(0, 6))):
        generation = acl.generation
        before = (dict(model.config), dict(model.blocklist))
        kind = data.draw(st.sampled_from(("update", "set", "config")))
        if kind == "update":
            present = list(model.blocklist)
            removed = data.draw(st.lists(st.one_of(networks(), *(
                [st.sampled_from(present)] if present else [])), max_size=4))
            added = data.draw(st.lists(entries(data.draw(
                st.sampled_from(("manual", "import", "auto")))), max_size=4))
            acl.update_blocklist(added, removed)
            for network in removed:
                model.blocklist.pop(network, None)
            model.blocklist.update((entry.network, entry) for entry in added)
        elif kind == "set":
            kept = data.draw(st.lists(st.sampled_from(list(model.blocklist.values())),
                                      max_size=6)) if model.blocklist else []
            new = [*kept, *data.draw(st.lists(entries("import"), max_size=4))]
            acl.set_blocklist(new)
            # An entry equal to the one already there is not written: that one stays.
            old = model.blocklist
            model.blocklist = {entry.network: entry for entry in new}
            model.blocklist.update((network, old[network]) for network, entry
                                   in model.blocklist.items() if old.get(network) == entry)
        else:
            new = data.draw(st.lists(entries("config"), max_size=6))
            acl.set_config(new)
            model.config = {entry.network: entry for entry in new}
        if (model.config, model.blocklist) != before:
            assert acl.generation == generation + 1
        else:
            assert acl.generation in (generation, generation + 1)
        among = [*model.config, *model.blocklist]
        check(acl, model, data.draw(st.lists(st.tuples(addresses(among), st.integers(-1, 101)),
                                             min_size=1, max_size=25)))
    # And the same layers built afresh agree with the list that was changed bit by bit.
    fresh = AccessList(list(model.config.values()), list(model.blocklist.values()))
    among = [*model.config, *model.blocklist]
    probes = data.draw(st.lists(st.tuples(addresses(among), st.integers(-1, 101)),
                                max_size=25))
    check(fresh, model, probes)


def test_without_the_extension_the_tables_are_dicts_and_the_lookup_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no compiler was available at install, the same list works on dicts with
    the reference lookup, and agrees with the oracle."""
    monkeypatch.setattr(acl_module, "AddressTable", None)
    monkeypatch.setattr(acl_module, "BlockTable", None)
    monkeypatch.setattr(acl_module, "_compiled_longest_match", None)
    rng = random.Random(5)

    def entry(origin: str) -> AclEntry:
        if rng.random() < 0.6:
            network: Network = ipaddress.IPv4Network(
                ((10 << 24) | rng.randrange(4) << 16 | rng.randrange(4) << 8 | rng.randrange(4),
                 rng.choice(V4_LENGTHS)), strict=False)
        else:
            network = ipaddress.IPv6Network(
                ((0x2001_0DB8 << 96) | rng.randrange(4) << 64 | rng.randrange(4),
                 rng.choice(V6_LENGTHS)), strict=False)
        return AclEntry(network, rng.choice(list(Action)), origin, "",
                        rng.choice((None, 0, 50, 100)))

    model = Model()
    model.config = {e.network: e for e in (entry("config") for _ in range(12))}
    model.blocklist = {e.network: e for e in (entry("manual") for _ in range(12))}
    acl = AccessList(list(model.config.values()), list(model.blocklist.values()))
    assert all(type(table) is dict for width in (4, 16) for _, table in acl.probes(width))
    assert type(acl.block_table) is acl_module.DictBlockTable
    among = [*model.config, *model.blocklist]
    probes = []
    for _ in range(600):
        network = rng.choice(among)
        packed = (network.network_address + rng.randrange(min(network.num_addresses,
                                                              1 << 20))).packed
        probes.append((packed, rng.randrange(-1, 102)))
    check(acl, model, probes)


def test_an_expired_blocklist_entry_uncovers_the_configuration_entry_beneath_it() -> None:
    config = AclEntry(SLASH24, Action.ALLOW)
    wider = AclEntry(NET("192.0.0.0/16"), Action.DENY)
    block = AclEntry(SLASH24, Action.DROP, "manual", "", 100)
    acl = AccessList([config, wider], [block])
    packed = bytes((192, 0, 2, 9))
    assert acl.lookup(packed, 99) is acl.verdict_of(block)   # the blocklist wins the tie
    assert acl.lookup(packed, 100) is config         # expired: what lies beneath
    acl.update_blocklist(removed=[SLASH24])
    assert acl.lookup(packed, 0) is config
    acl.set_config([wider])
    assert acl.lookup(packed, 0) is wider            # no /24 left: a shorter prefix


# ------------------------------------------------------------------ the regression

def config_drop_pipeline() -> tuple[Pipeline, AclEntry]:
    policy = FilterPolicy(random_seed=1, acl=(AclEntry(SLASH24, Action.DROP),))
    pipeline = Pipeline(policy, Responder(CLOCK, WALL))
    block = AclEntry(SLASH24, Action.DROP, "manual", "flood", WALL + 60 * NS_PER_S)
    pipeline.update_blocklist([block])
    return pipeline, block


def test_a_config_drop_stays_when_a_blocklist_ttl_on_the_same_cidr_runs_out() -> None:
    pipeline, block = config_drop_pipeline()
    source = bytes((192, 0, 2, 7))
    now_ns = 10 * NS_PER_S
    assert pipeline.decide(REQUEST, source, 40_000, WALL + now_ns, now_ns)[0] \
        is Reason.BLOCKLISTED
    now_ns = 61 * NS_PER_S                            # the TTL has run out
    for host in (7, 8):                               # a known source, a new one
        reason = pipeline.decide(REQUEST, bytes((192, 0, 2, host)), 40_000,
                                 WALL + now_ns, now_ns)[0]
        assert reason is Reason.ACL_DENY, host
    # Removed instead of expired, the same; and a reload keeps the blocklist layer.
    pipeline.update_blocklist([replace(block, expires_ns=None)])
    assert pipeline.decide(REQUEST, source, 40_000, WALL + now_ns, now_ns)[0] \
        is Reason.BLOCKLISTED
    pipeline.apply_policy(replace(pipeline.policy, source_burst=9,
                                  acl=(AclEntry(SLASH24, Action.DROP, reason="new"),)))
    assert pipeline.decide(REQUEST, source, 40_000, WALL + now_ns, now_ns)[0] \
        is Reason.BLOCKLISTED
    pipeline.update_blocklist(removed=[SLASH24])
    assert pipeline.decide(REQUEST, source, 40_000, WALL + now_ns, now_ns)[0] \
        is Reason.ACL_DENY
    assert pipeline.counters.by_reason().get("answered", 0) == 0


@pytest.mark.skipif(not fastlane.available(),
                    reason=f"compiled loop unavailable: {fastlane.unavailable_because()}")
def test_the_compiled_loop_keeps_the_config_drop_when_the_ttl_runs_out() -> None:
    pipeline, _ = config_drop_pipeline()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lane = fastlane.FastLane(sock, pipeline)
    seen: dict[tuple[int, bool], set[Reason]] = {}
    in_c_after: set[bool] = set()
    try:
        now_ns = 10 * NS_PER_S
        for step in range(120):        # 1 s apart: the TTL runs out at step 50
            now_ns += NS_PER_S
            expired = WALL + now_ns >= WALL + 60 * NS_PER_S
            # 192.0.2.1 over and over (its cached entry expires), and a new source
            # every step (the loop's own first lookup).
            for source in (bytes((192, 0, 2, 1)), bytes((192, 0, 2, 10 + step))):
                reason, reply, _, in_c = lane.decide_one(REQUEST, source, 40_000,
                                                         WALL + now_ns, now_ns)
                assert reply is None, (step, source)
                seen.setdefault((source[3], expired), set()).add(Reason(reason))
                if expired:
                    in_c_after.add(in_c)
    finally:
        sock.close()
    assert seen[(1, False)] == {Reason.BLOCKLISTED}
    assert seen[(1, True)] == {Reason.ACL_DENY}
    after = set().union(*(reasons for (host, expired), reasons in seen.items()
                          if expired and host != 1))
    assert after == {Reason.ACL_DENY}
    assert True in in_c_after            # decided by the compiled loop itself, too
    assert pipeline.counters.by_reason().get("answered", 0) == 0


# ------------------------------------------------------------------ by difference

def many(count: int, expires_ns: int | None = None, origin: str = "import") -> list[AclEntry]:
    """``count`` entries: /32s in 10.0.0.0/8 and, one in four, /24s in 11.0.0.0/8."""
    return [AclEntry(ipaddress.IPv4Network(((10 << 24) + index, 32)) if index % 4 else
                     ipaddress.IPv4Network(((11 << 24) + (index << 8), 24)),
                     Action.DROP, origin, "feed", expires_ns) for index in range(count)]


@pytest.fixture(scope="module")
def hundred_thousand() -> list[AclEntry]:
    return many(100_000)


def test_one_block_add_among_100k_entries_writes_one_key(
        hundred_thousand: list[AclEntry], monkeypatch: pytest.MonkeyPatch) -> None:
    policy = FilterPolicy(random_seed=1, acl=(AclEntry(SLASH24, Action.DROP),))
    pipeline = Pipeline(policy, Responder(CLOCK, WALL))
    pipeline.update_blocklist(hundred_thousand)
    acl = pipeline.acl
    assert len(acl) == 100_001
    tables = {where: id(table) for where, table in acl._tables.items()}
    probes, block_table = acl._probes, acl.block_table
    rebuilt: list[object] = []
    monkeypatch.setattr(AccessList, "adopt", lambda self, other: rebuilt.append(other))
    generation = acl.generation
    added = AclEntry(NET("10.0.0.1/32"), Action.DENY, "manual")   # replaces one
    new = AclEntry(NET("198.51.100.7/32"), Action.DROP, "manual")
    pipeline.update_blocklist([added, new])
    assert acl.generation == generation + 1 and len(acl) == 100_002
    assert acl.lookup(bytes((10, 0, 0, 1)), 0) is acl.verdict_of(added)
    assert acl.lookup(bytes((198, 51, 100, 7)), 0) is acl.verdict_of(new)
    pipeline.update_blocklist(removed=[NET("10.0.0.2/32")])
    assert acl.generation == generation + 2
    assert acl.lookup(bytes((10, 0, 0, 2)), 0) is None
    assert len(acl) == 100_001
    # The same tables throughout, and no new index of prefix lengths: nothing rebuilt.
    assert {where: id(table) for where, table in acl._tables.items()} == tables
    assert acl._probes is probes and acl.block_table is block_table and rebuilt == []
    # A change that changes nothing keeps the generation (cached lookups stay valid).
    pipeline.update_blocklist([added], [NET("203.0.113.0/24")])
    assert acl.generation == generation + 2


def test_a_bad_entry_leaves_the_list_as_it_was(hundred_thousand: list[AclEntry]) -> None:
    acl = AccessList([AclEntry(SLASH24, Action.DROP)], hundred_thousand[:1000])
    generation, before = acl.generation, sorted(acl.entries(), key=repr)
    good = AclEntry(NET("198.51.100.0/24"), Action.DROP, "manual")
    for bad in (object(), AclEntry(NET("203.0.113.0/24"), "drop", "manual"),   # type: ignore[arg-type]
                AclEntry(NET("203.0.113.0/24"), Action.DROP, "manual", "", 1.5)):  # type: ignore[arg-type]
        with pytest.raises((TypeError, AttributeError)):
            acl.update_blocklist([good, bad], [hundred_thousand[3].network])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            acl.update_blocklist([good], ["10.0.0.3/32"])   # type: ignore[list-item]
        assert acl.generation == generation and sorted(acl.entries(), key=repr) == before
        assert acl.lookup(bytes((198, 51, 100, 1)), 0) is None
    change = acl.plan(added=[good])
    acl.update_blocklist(removed=[hundred_thousand[3].network])   # the list moved on
    with pytest.raises(RuntimeError):
        acl.apply(change)                              # a stale change is refused


class _Clock:
    def __init__(self) -> None:
        self.wall_ns = WALL
        self.mono_ns = 5_000 * NS_PER_S


class _Timers:
    def add_periodic(self, interval_s: float, callback: object) -> None:
        pass


def test_the_live_blocklist_hands_over_only_what_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    now = clock.wall_ns
    policy = FilterPolicy(random_seed=1, acl=(AclEntry(SLASH24, Action.DROP),))
    pipeline = Pipeline(policy, Responder(CLOCK, now))
    writer = BlockStore.in_state_dir(tmp_path)
    feed = [BlockEntry(entry.network, "drop", "feed", now, None, "import")
            for entry in many(5000)]
    writer.upsert(feed, now)
    calls: list[tuple[int, int]] = []   # (networks written, networks cleared) per change
    write = pipeline.write_blocklist

    def counting(wanted):   # type: ignore[no-untyped-def]
        cleared = sum(verdict is None for verdict in wanted.values())
        calls.append((len(wanted) - cleared, cleared))
        write(wanted)

    monkeypatch.setattr(pipeline, "write_blocklist", counting)
    live = setup_blocklist(tmp_path, pipeline, _Timers(), parse_auto_policy({}))
    live.wall_ns, live.monotonic_ns = (lambda: clock.wall_ns), (lambda: clock.mono_ns)
    rows_read: list[int] = []      # per read of the store: how many rows it handed over
    read_all, read_changes = live.store.read_all, live.store.read_changes

    @contextlib.contextmanager
    def counting_all():   # type: ignore[no-untyped-def]
        with read_all() as (position, rows):
            rows = list(rows)
            rows_read.append(len(rows))
            yield position, iter(rows)

    def counting_changes(since):   # type: ignore[no-untyped-def]
        changes = read_changes(since)
        rows_read.append(len(changes.rows) + len(changes.gone))
        return changes

    monkeypatch.setattr(live.store, "read_all", counting_all)
    monkeypatch.setattr(live.store, "read_changes", counting_changes)
    try:
        assert calls == [(5000, 0)] and live.active_entries == 5000
        source = bytes((192, 0, 2, 7))

        def reason() -> Reason:
            return pipeline.decide(REQUEST, source, 40_000, clock.wall_ns, clock.mono_ns)[0]

        assert reason() is Reason.ACL_DENY
        # block add on the configuration's /24, with a TTL; and an update in place.
        writer.upsert([BlockEntry(SLASH24, "drop", "x", now, now + 3 * NS_PER_S, "manual"),
                       replace(feed[1], action="deny")], now)
        generation = pipeline.acl.generation
        live.refresh()
        assert calls[-1] == (2, 0) and pipeline.acl.generation == generation + 1
        assert reason() is Reason.BLOCKLISTED and live.active_entries == 5001
        # block remove
        writer.remove(feed[2].network, now)
        live.refresh()
        assert calls[-1] == (0, 1) and live.active_entries == 5000
        assert pipeline.acl.lookup(feed[2].network.network_address.packed, now) is None
        live.refresh()                                 # nothing new: nothing handed over
        # Two reads of the store, of the two rows and the one row that changed.
        assert len(calls) == 3 and rows_read == [2, 1]
        # The TTL runs out: swept out of the table, no row read, nothing handed over;
        # the config's drop is back.
        clock.wall_ns += 3 * NS_PER_S
        clock.mono_ns += 3 * NS_PER_S
        live.refresh()
        assert len(calls) == 3 and rows_read == [2, 1] and live.active_entries == 4999
        assert reason() is Reason.ACL_DENY
        assert pipeline.acl.lookup(feed[1].network.network_address.packed,
                                   clock.wall_ns).action is Action.DENY
        # A load that cannot apply (a row no filter can take) changes nothing: a
        # one-line warning, and the change is tried again on the next tick.
        writer.upsert([BlockEntry(NET("203.0.113.0/24"), "drop", "y", now, None, "manual"),
                       BlockEntry(NET("198.51.100.0/24"), "drop", "y", now, None, "manual")],
                      clock.wall_ns)
        writer.db.execute("UPDATE blocks SET cidr = 'junk' WHERE cidr = '203.0.113.0/24'")
        for _ in range(2):                             # not taken as loaded: read again
            live.refresh()
            assert "'junk' cannot be applied" in live.last_error
            assert "\n" not in live.last_error
        assert len(calls) == 3 and live.active_entries == 4999 and len(rows_read) == 4
        assert pipeline.acl.lookup(bytes((198, 51, 100, 1)), clock.wall_ns) is None
        writer.db.execute("DELETE FROM blocks WHERE cidr = 'junk'")
        live.refresh()                # re-read: the good row of the same change goes in
        assert calls[-1] == (1, 0) and len(rows_read) == 5 and live.last_error == ""
        assert live.active_entries == 5000
    finally:
        writer.close()
        live.close()


def test_lapsed_entries_are_swept_out_a_bounded_step_at_a_time() -> None:
    """An import of 100 000 that lapses leaves the table over several bounded steps;
    no lookup matches one meanwhile, and what stays is untouched."""
    feed = many(100_000, expires_ns=1_000)
    kept = AclEntry(NET("198.51.100.0/24"), Action.DROP, "manual")
    acl = AccessList([AclEntry(SLASH24, Action.DROP)], [*feed, kept])
    assert acl.expire_blocklist(999, 50_000) == 0 and len(acl) == 100_002
    assert acl.lapsed_blocklist_entries(1_000) == 100_000
    generation = acl.generation
    left, steps = 100_000, 0
    while left:
        assert acl.lookup(feed[5].packed, 1_000) is None
        before = left
        left = acl.expire_blocklist(1_000, 50_000)
        assert left < before or steps > 0
        assert left == acl.lapsed_blocklist_entries(1_000) == len(acl) - 2
        steps += 1
        assert steps < 100
    assert steps > 1 and acl.generation > generation
    assert acl.blocklist_entries() == [kept] and len(acl) == 2
    assert acl.lookup(bytes((198, 51, 100, 9)), 1_000) is acl.verdict_of(kept)
    assert acl.expire_blocklist(2_000, 50_000) == 0
