"""The compiled blocklist layer, ``_fastlane.BlockTable``, and the lookup over both layers.

The table is checked against a plain dict of network -> verdict through random
batches of puts, replaces, deletes and duplicate networks (its entries, lengths,
the verdicts' use counts, and the references it holds); ``longest_match`` over
the configuration's AddressTables and a BlockTable against a brute-force
``ipaddress`` oracle; ``apply`` is all or nothing; ``purge`` removes exactly the
entries of the verdicts it is given, a bounded number of slots per call, from a
cursor that stays safe while the table changes; the packet loop reads the
access list's ``block_table`` and decides as Pipeline.decide does over it.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import socket
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_fastlane = pytest.importorskip("guardntp._fastlane")

from guardntp import fastlane  # noqa: E402
from guardntp.clock import ClockState  # noqa: E402
from guardntp.filter import acl as acl_module  # noqa: E402
from guardntp.filter.acl import AclEntry, Action  # noqa: E402
from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.policy import FilterPolicy  # noqa: E402
from guardntp.responder import Responder  # noqa: E402
from guardntp.timestamps import NS_PER_S  # noqa: E402
from guardntp.verdicts import Reason  # noqa: E402

BlockTable = _fastlane.BlockTable
AddressTable = _fastlane.AddressTable
longest_match = _fastlane.longest_match

Net = tuple[bytes, int]   # (packed network address, prefix length)


@dataclass(frozen=True, eq=False)
class Verdict:
    """What the blocklist's entries share (by identity: eq=False)."""

    action: Action
    origin: str = "import"
    reason: str = "feed"
    expires_ns: int | None = None

    def active(self, now_ns: int) -> bool:
        return self.expires_ns is None or now_ns < self.expires_ns


def net(width: int, address: int, prefixlen: int) -> Net:
    """The network of ``prefixlen`` holding ``address`` (host bits cleared)."""
    bits = 8 * width
    address &= ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
    return address.to_bytes(width, "big"), prefixlen


def pool(n: int = 4) -> list[Verdict]:
    return [Verdict(Action.DROP if i % 2 else Action.DENY, reason=f"feed {i}") for i in range(n)]


def refcounts(objects: Iterable[object]) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


def check(table: object, model: dict[Net, Verdict], gone: Iterable[Net] = ()) -> None:
    """Everything the table says against the model."""
    assert len(table) == len(model)
    items = table.items()
    assert len(items) == len(model)
    assert {(p, n): id(v) for p, n, v in items} == {k: id(v) for k, v in model.items()}
    for (packed, prefixlen), verdict in model.items():
        assert table.get(packed, prefixlen) is verdict
    for packed, prefixlen in gone:
        if (packed, prefixlen) not in model:
            assert table.get(packed, prefixlen) is None
    for width in (4, 16):
        expected = tuple(sorted({n for p, n in model if len(p) == width}, reverse=True))
        assert table.lengths(width) == expected
    uses = Counter(id(v) for v in model.values())
    held = table.verdicts()
    assert {id(v): n for v, n in held} == uses
    assert len(held) == len(uses)


# ------------------------------------------------------------------ batches against a dict

V4_LENGTHS = (0, 1, 7, 8, 23, 24, 31, 32)
V6_LENGTHS = (0, 1, 63, 64, 65, 127, 128)


@st.composite
def networks(draw: st.DrawFn) -> Net:
    if draw(st.booleans()):
        address = 10 << 24 | draw(st.integers(0, 3)) << 8 | draw(st.sampled_from((0, 1, 2, 255)))
        return net(4, address, draw(st.sampled_from(V4_LENGTHS)))
    address = (0x2001_0DB8 << 96 | draw(st.integers(0, 3)) << 64 | draw(st.integers(0, 3))
               | draw(st.sampled_from((0, 1 << 63, 1 << 62))))
    return net(16, address, draw(st.sampled_from(V6_LENGTHS)))


verdict_choice = st.one_of(st.none(), st.integers(0, 3))   # None: delete


@st.composite
def moves(draw: st.DrawFn) -> list[tuple[Net, int | None]]:
    """One network, or a run of consecutive ones (so that sub-tables grow and shrink)."""
    choice = draw(verdict_choice)
    if draw(st.integers(0, 4)) > 0:
        return [(draw(networks()), choice)]
    width, prefixlen = draw(st.sampled_from(((4, 32), (4, 24), (16, 128), (16, 64))))
    start = draw(st.integers(0, 600))
    count = draw(st.integers(1, 400))
    base = 11 << 24 if width == 4 else 0x2001_0DB8_FFFF << 80
    step = 1 << (8 * width - prefixlen)
    return [(net(width, base + (start + i) * step, prefixlen), choice) for i in range(count)]


batches = st.lists(st.lists(moves(), max_size=6).map(lambda ms: [m for ms_ in ms for m in ms_]),
                   min_size=1, max_size=8)


def run_batches(table: object, verdicts: list[Verdict],
                steps: list[list[tuple[Net, int | None]]]) -> dict[Net, Verdict]:
    model: dict[Net, Verdict] = {}
    seen: set[Net] = set()
    for step in steps:
        ops = [(p, n, None if c is None else verdicts[c]) for (p, n), c in step]
        table.apply(ops)
        for (key, choice) in step:   # in order: a later op on the same network wins
            seen.add(key)
            if choice is None:
                model.pop(key, None)
            else:
                model[key] = verdicts[choice]
        check(table, model, seen)
    return model


@settings(max_examples=120, deadline=None)
@given(batches)
def test_batches_of_puts_replaces_and_deletes_match_a_dict(
        steps: list[list[tuple[Net, int | None]]]) -> None:
    verdicts = pool()
    baseline = refcounts(verdicts)
    table = BlockTable()
    model = run_batches(table, verdicts, steps)
    # the table holds one reference per distinct verdict, not one per entry
    held = {id(v) for v in model.values()}
    assert [c - b for c, b in zip(refcounts(verdicts), baseline, strict=True)] == [
        sum(1 for m in model.values() if m is v) + (id(v) in held) for v in verdicts]
    keys = list(model)
    model.clear()
    table.apply([(p, n, None) for p, n in keys])
    check(table, {}, keys)
    assert table.lengths(4) == table.lengths(16) == ()
    assert refcounts(verdicts) == baseline


@settings(max_examples=60, deadline=None)
@given(batches)
def test_the_reference_model_keeps_the_same_table(
        steps: list[list[tuple[Net, int | None]]]) -> None:
    """acl.DictBlockTable, the blocklist layer without the extension, through the same
    batches: the same entries, lengths and verdict uses."""
    verdicts = pool()
    model = run_batches(acl_module.DictBlockTable(), verdicts, steps)
    table = BlockTable()
    assert run_batches(table, verdicts, steps) == model


def test_a_dropped_table_releases_its_verdicts() -> None:
    verdicts = pool()
    baseline = refcounts(verdicts)
    table = BlockTable()
    table.apply([net(4, 10 << 24 | i, 32) + (verdicts[i % 4],) for i in range(1000)])
    assert refcounts(verdicts) == [b + 1 for b in baseline]
    del table
    assert refcounts(verdicts) == baseline


def test_a_verdict_is_released_only_once_the_table_is_whole() -> None:
    """A verdict whose last entry goes may run Python code as it is released (a
    finaliser): by then the table is consistent and usable."""
    table = BlockTable()
    seen: list[object] = []

    class Noisy(Verdict):
        def __del__(self) -> None:
            seen.append((len(table), table.items(), table.verdicts()))
            table.apply([(bytes(4), 0, other)])

    other = Verdict(Action.DROP)
    table.apply([net(4, 10 << 24, 8) + (Noisy(Action.DROP),),
                 net(4, 10 << 24 | 1, 32) + (other,)])
    table.apply([net(4, 10 << 24, 8) + (None,)])
    gc.collect()
    assert seen == [(1, [(net(4, 10 << 24 | 1, 32) + (other,))], [(other, 1)])]
    assert table.get(bytes(4), 0) is other and len(table) == 2


def test_the_networks_at_the_ends_of_each_family_round_trip() -> None:
    v = Verdict(Action.DROP)
    v6 = int(ipaddress.IPv6Address("2001:db8:1:2:ffff:ffff:ffff:ffff"))
    nets = [net(16, 0, 0), net(16, v6, 64), net(16, v6, 65), net(16, v6, 128),
            net(16, (1 << 128) - 1, 128), net(4, 0, 0), net(4, 0xC0000201, 32),
            net(4, 0xFFFFFFFF, 32)]
    assert nets[2][0] == ipaddress.IPv6Address("2001:db8:1:2:8000::").packed
    table = BlockTable()
    table.apply([key + (v,) for key in nets])
    check(table, dict.fromkeys(nets, v))
    assert table.lengths(16) == (128, 65, 64, 0) and table.lengths(4) == (32, 0)
    for packed, prefixlen in nets:
        network = ipaddress.ip_network((packed, prefixlen))
        assert network.prefixlen == prefixlen   # (strict: host bits are zero)
        assert longest_match((), table, packed, 0) is v
    with pytest.raises(ValueError, match="host bits set past the /65"):
        table.get(net(16, v6, 66)[0], 65)
    with pytest.raises(ValueError, match="host bits set past the /0"):
        table.get(bytes((0, 0, 0, 1)), 0)
    with pytest.raises(ValueError, match="4 or 16"):
        table.lengths(6)
    table.apply([key + (None,) for key in nets])
    check(table, {}, nets)


# ------------------------------------------------------------------ apply: all or nothing

V = Verdict(Action.DROP)


@pytest.mark.parametrize(("bad", "error", "message"), [
    ((bytes(3), 24, V), ValueError, "4 or 16 bytes, not 3"),
    ((bytes(5), 0, V), ValueError, "4 or 16 bytes, not 5"),
    ((bytes((10, 0, 0, 1)), 24, V), ValueError, "host bits set past the /24"),
    (((1).to_bytes(16, "big"), 127, V), ValueError, "host bits set past the /127"),
    ((bytes(4), 33, V), ValueError, "prefix length"),
    ((bytes(4), -1, V), ValueError, "prefix length"),
    ((bytes(16), 129, V), ValueError, "prefix length"),
    ((bytes(4), 1 << 80, V), ValueError, "prefix length"),
    ([bytes(4), 0, V], TypeError, "tuple, not list"),
    (7, TypeError, "tuple, not int"),
    ((bytes(4), 0), TypeError, "tuple"),
    ((bytes(4), 0, V, None), TypeError, "tuple"),
    (("10.0.0.0", 8, V), TypeError, "bytes, not str"),
    ((bytearray(4), 0, V), TypeError, "bytes, not bytearray"),
    ((bytes(4), 8.0, V), TypeError, "int, not float"),
    ((bytes(4), True, V), TypeError, "int, not bool"),
])
def test_a_batch_with_a_bad_op_changes_nothing(bad: object, error: type[Exception],
                                               message: str) -> None:
    verdicts = pool()
    table = BlockTable()
    before = {net(4, 10 << 24 | i, 32): verdicts[i % 2] for i in range(20)}
    before[net(16, 0x2001_0DB8 << 96, 32)] = verdicts[1]
    table.apply([k + (v,) for k, v in before.items()])
    lengths = table.lengths(4), table.lengths(16)
    fresh = Verdict(Action.DENY)   # new to the table: must not be taken either
    batch = [net(4, 12 << 24, 8) + (fresh,),            # a new network, a new verdict
             net(4, 10 << 24 | 3, 32) + (None,),        # a delete
             net(4, 10 << 24 | 4, 32) + (verdicts[3],),  # a replace
             net(16, 0x2001_0DB9 << 96, 32) + (fresh,),
             bad,
             net(4, 13 << 24, 8) + (verdicts[2],)]
    baseline = refcounts(verdicts)   # (the batch holds some)
    fresh_count = sys.getrefcount(fresh)
    with pytest.raises(error, match=rf"^ops\[4\]: .*{message}"):
        table.apply(batch)
    check(table, before)
    assert (table.lengths(4), table.lengths(16)) == lengths
    assert refcounts(verdicts) == baseline
    assert sys.getrefcount(fresh) == fresh_count
    table.apply(batch[:4] + batch[5:])   # without it, the batch goes in
    assert table.get(*net(4, 12 << 24, 8)) is fresh and len(table) == 23


def test_apply_takes_any_sequence_and_refuses_anything_else() -> None:
    table = BlockTable()
    table.apply(tuple(net(4, 10 << 24 | i, 32) + (V,) for i in range(3)))
    table.apply(op for op in [net(4, 10 << 24, 32) + (None,)])   # (an iterable, made a list)
    assert len(table) == 2
    table.apply([])
    assert len(table) == 2
    with pytest.raises(TypeError):
        table.apply(5)
    with pytest.raises(TypeError):
        table.get(bytes(4))
    with pytest.raises(TypeError):
        BlockTable(1)
    assert table.get(bytes(16), 0) is None


def test_a_batch_may_name_one_network_more_than_once() -> None:
    """The ops run in order: the last one on a network wins; a verdict that all its
    entries lose within the batch is let go."""
    a, b, c = pool(3)
    baseline = refcounts((a, b, c))
    table = BlockTable()
    x, y = net(4, 10 << 24, 24), net(16, 1 << 127, 1)
    table.apply([x + (a,), x + (b,), y + (c,), y + (None,), x + (None,), x + (c,), y + (a,)])
    check(table, {x: c, y: a})
    table.apply([x + (None,), x + (b,), x + (None,)])
    check(table, {y: a})
    table.apply([y + (None,)])
    assert refcounts((a, b, c)) == baseline


# ------------------------------------------------------------------ longest_match: both layers

@st.composite
def config_entries(draw: st.DrawFn) -> AclEntry:
    packed, prefixlen = draw(networks())
    expires = draw(st.one_of(st.none(), st.integers(0, 100)))
    return AclEntry(ipaddress.ip_network((packed, prefixlen)), draw(st.sampled_from(list(Action))),
                    "config", "", expires)


@st.composite
def block_entries(draw: st.DrawFn, verdicts: list[Verdict]) -> tuple[Net, Verdict]:
    return draw(networks()), draw(st.sampled_from(verdicts))


def config_probes(entries: Iterable[AclEntry]) -> dict[int, tuple[tuple[int, object], ...]]:
    """The configuration layer as acl.py lays it out: per width, (prefixlen, AddressTable)
    longest first, each keyed by acl._prefix_bytes."""
    tables: dict[tuple[int, int], object] = {}
    for entry in entries:
        width, prefixlen = len(entry.packed), entry.prefixlen
        prefix = int.from_bytes(entry.packed, "big") >> (8 * width - prefixlen)
        table = tables.setdefault((width, prefixlen), AddressTable())
        table[acl_module._prefix_bytes(prefix, prefixlen)] = entry
    return {width: tuple((n, tables[(w, n)]) for w, n in sorted(tables, reverse=True)
                         if w == width) for width in (4, 16)}


def oracle(config: Iterable[AclEntry], block: dict[Net, Verdict], packed: bytes,
           now_ns: int) -> object:
    address = ipaddress.ip_address(packed)
    best: tuple[int, int] | None = None
    found: object = None
    layers = [(0, [(e.network, e) for e in config]),
              (1, [(ipaddress.ip_network(k), v) for k, v in block.items()])]
    for rank, layer in layers:
        for network, entry in layer:
            if (network.version == address.version and address in network
                    and entry.active(now_ns)
                    and (best is None or (network.prefixlen, rank) > best)):
                best, found = (network.prefixlen, rank), entry
    return found


@st.composite
def addresses(draw: st.DrawFn, among: list[Net]) -> bytes:
    if among and draw(st.booleans()):
        packed, prefixlen = draw(st.sampled_from(among))
        network = ipaddress.ip_network((packed, prefixlen))
        return (network.network_address
                + draw(st.integers(0, min(network.num_addresses - 1, 1 << 70)))).packed
    if draw(st.booleans()):
        return (10 << 24 | draw(st.integers(0, 1 << 12))).to_bytes(4, "big")
    return (0x2001_0DB8 << 96 | draw(st.integers(0, 4)) << 64
            | draw(st.integers(0, 1 << 64))).to_bytes(16, "big")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_longest_match_over_both_layers_matches_a_brute_force_oracle(data: st.DataObject) -> None:
    verdicts = [Verdict(Action.DROP, expires_ns=e) for e in (None, None, 10, 50, 0)]
    config = {(e.packed, e.prefixlen): e
              for e in data.draw(st.lists(config_entries(), max_size=12))}
    block = dict(data.draw(st.lists(block_entries(verdicts), max_size=12)))
    table = BlockTable()
    table.apply([k + (v,) for k, v in block.items()])
    probes = config_probes(config.values())
    among = list(config) + list(block)
    for _ in range(25):
        packed = data.draw(addresses(among))
        now_ns = data.draw(st.integers(0, 120))
        expected = oracle(config.values(), block, packed, now_ns)
        assert longest_match(probes[len(packed)], table, packed, now_ns) is expected
        if not block:
            assert longest_match(probes[len(packed)], None, packed, now_ns) is expected


def test_the_blocklist_wins_a_tie_and_a_lapsed_entry_uncovers_the_next() -> None:
    address = bytes((192, 0, 2, 9))
    slash24 = net(4, 0xC0000200, 24)
    config24 = AclEntry(ipaddress.ip_network("192.0.2.0/24"), Action.EXEMPT, "config", "",
                        expires_ns=80)
    config16 = AclEntry(ipaddress.ip_network("192.0.0.0/16"), Action.DENY)
    probes = config_probes([config24, config16])[4]
    blocked = Verdict(Action.DROP, expires_ns=40)
    table = BlockTable()
    lapsed = Verdict(Action.DROP, expires_ns=0)
    table.apply([slash24 + (blocked,), net(4, 0xC0000209, 32) + (lapsed,)])
    assert longest_match(probes, table, address, 39) is blocked     # /32 lapsed; tie: blocklist
    assert longest_match(probes, table, address, 40) is config24    # then the configuration's
    assert longest_match(probes, table, address, 80) is config16    # then the shorter prefix
    assert longest_match(probes, None, address, 39) is config24
    assert longest_match((), table, bytes((192, 0, 3, 1)), 0) is None
    assert longest_match(probes, table, bytes((192, 0, 3, 1)), 0) is config16
    assert longest_match(probes, table, bytes(16), 0) is None   # another family
    with pytest.raises(TypeError, match="BlockTable or None"):
        longest_match(probes, {}, address, 0)
    with pytest.raises(ValueError, match="4 or 16"):
        longest_match(probes, table, bytes(5), 0)


def test_an_expiry_that_is_not_an_int_is_an_error_not_a_crash() -> None:
    table = BlockTable()
    table.apply([(bytes(4), 0, Verdict(Action.DROP, expires_ns="soon"))])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expires_ns"):
        longest_match((), table, bytes(4), 0)
    table.apply([(bytes(4), 0, object())])   # no attributes at all
    with pytest.raises(AttributeError):
        longest_match((), table, bytes(4), 0)


# ------------------------------------------------------------------ purge

def purge_all(table: object, targets: list[Verdict], max_slots: int,
              between: list[list[tuple[bytes, int, object]]] | None = None) -> int:
    """Passes of purge() until the targets have no uses; the passes taken. ``between``:
    batches applied between calls (the cursor must stay safe)."""
    passes = 0
    target_ids = {id(t) for t in targets}
    while any(id(v) in target_ids for v, _ in table.verdicts()):
        passes += 1
        assert passes <= 8, "the passes do not converge"
        cursor, calls, bound = 0, 0, 100 + 20 * (len(table) + 1400) // max_slots
        while True:
            removed, cursor = table.purge(targets, cursor, max_slots)
            assert 0 <= removed <= max_slots
            calls += 1
            assert calls <= bound
            if between:
                table.apply(between.pop(0))
            if cursor == 0:
                break
    return passes


def changes_between(model: dict[Net, Verdict], keep: list[Verdict], seed: int
                    ) -> list[list[tuple[bytes, int, object]]]:
    """Batches to apply between purge() calls: deletions of entries that stay (they
    shrink sub-tables under the cursor) and new entries of the verdicts that stay."""
    rng = random.Random(seed)
    others = [k for k, v in model.items() if any(v is w for w in keep)]
    between = []
    for _ in range(20):
        sample = rng.sample(others, min(len(others), rng.randint(0, 50)))
        batch: list[tuple[bytes, int, object]] = [k + (None,) for k in sample]
        batch += [net(4, 12 << 24 | rng.randrange(1 << 16), 32) + (rng.choice(keep),)
                  for _ in range(rng.randint(0, 5))]
        between.append(batch)
    return between


def replay(model: dict[Net, Verdict], applied: list[list[tuple[bytes, int, object]]]) -> None:
    for batch in applied:
        for packed, prefixlen, verdict in batch:
            if verdict is None:
                model.pop((packed, prefixlen), None)
            else:
                model[(packed, prefixlen)] = verdict  # type: ignore[assignment]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_purge_removes_exactly_the_entries_of_its_verdicts(data: st.DataObject) -> None:
    verdicts = pool(5)
    baseline = refcounts(verdicts)
    table = BlockTable()
    model = run_batches(table, verdicts, data.draw(batches))
    # (indices: a strategy over the objects would hold references to them)
    chosen = data.draw(st.lists(st.integers(0, 4), max_size=3, unique=True))
    targets = [verdicts[i] for i in chosen]
    max_slots = data.draw(st.sampled_from((1, 2, 7, 64, 1000, 10**6)))
    if len(table) > 1000:   # (a slot a call over thousands of entries: slow, no wiser)
        max_slots = max(max_slots, 64)
    between = []
    if len(chosen) < 5 and data.draw(st.booleans()):
        between = changes_between(model, [v for i, v in enumerate(verdicts) if i not in chosen],
                                  data.draw(st.integers(0, 1000)))
    applied = list(between)
    # a verdict held by no entry is ignored
    purge_all(table, targets + [Verdict(Action.DROP)], max_slots, between)
    replay(model, applied[:len(applied) - len(between)])   # the batches that went in
    del applied, between
    model = {k: v for k, v in model.items() if all(v is not t for t in targets)}
    check(table, model)
    assert refcounts(targets) == [baseline[i] + 1 for i in chosen]   # (targets holds it)
    table.apply([k + (None,) for k in model])
    model.clear()
    del targets
    assert refcounts(verdicts) == baseline


def test_purge_is_bounded_and_resumable_over_a_big_table() -> None:
    doomed, kept = Verdict(Action.DROP), Verdict(Action.DENY)
    table = BlockTable()
    table.apply([net(4, 10 << 24 | i, 32) + (doomed if i % 3 else kept,) for i in range(30_000)]
                + [net(16, 0x2001_0DB8 << 96 | i << 64, 64) + (doomed,) for i in range(3000)])
    cursors, total = [], 0
    cursor = 0
    while True:
        removed, cursor = table.purge([doomed], cursor, 5000)
        assert removed <= 5000
        total += removed
        cursors.append(cursor)
        if cursor == 0:
            break
    assert len(cursors) > 10   # a pass over ~70 000 slots, 5000 at a time
    assert len(cursors) == len(set(cursors))
    purge_all(table, [doomed], 5000)
    assert table.verdicts() == [(kept, 10_000)] and len(table) == 10_000
    assert table.lengths(16) == () and table.lengths(4) == (32,)
    assert sys.getrefcount(doomed) == 2   # (the local and getrefcount's argument)


def test_purge_of_nothing_it_holds_changes_nothing() -> None:
    verdicts = pool(2)
    table = BlockTable()
    model = {net(4, 10 << 24 | i, 32): verdicts[i % 2] for i in range(100)}
    table.apply([k + (v,) for k, v in model.items()])
    assert table.purge([Verdict(Action.DROP)], 0, 10) == (0, 0)
    assert table.purge([], 0, 10) == (0, 0)
    assert table.purge(iter(()), 12345, 10) == (0, 0)
    check(table, model)
    # a cursor past the end is the end of the pass; a bad argument is an error
    assert table.purge([verdicts[0]], 1 << 40, 10) == (0, 0)
    assert table.purge([verdicts[0]], 1 << 100, 10) == (0, 0)
    for start, max_slots in ((-1, 10), (0, 0), (0, -5)):
        with pytest.raises(ValueError):
            table.purge([verdicts[0]], start, max_slots)
    with pytest.raises(TypeError):
        table.purge([verdicts[0]], "0", 10)
    with pytest.raises(TypeError):
        table.purge(5, 0, 10)
    check(table, model)



@pytest.mark.parametrize("emptied_by", ["apply", "purge"])
def test_an_emptied_big_table_is_given_back_in_slices(emptied_by: str) -> None:
    verdict = Verdict(Action.DROP)
    table = BlockTable()
    nets = [net(4, 10 << 24 | i, 32) for i in range(300_000)]   # 2**20 slots: 8 MiB
    table.apply([n + (verdict,) for n in nets])
    assert table.release(1 << 20) == 0   # nothing retired yet
    if emptied_by == "apply":
        table.apply([n + (None,) for n in nets])
    else:
        purge_all(table, [verdict], 50_000)
        table.purge([verdict], 0, 50_000)   # (the pass that finds the table empty)
    assert len(table) == 0 and table.lengths(4) == ()
    waiting = [table.release(1 << 20)]
    while waiting[-1]:
        waiting.append(table.release(1 << 20))
        assert len(waiting) < 20
    assert 7 <= len(waiting) <= 9 and waiting == sorted(waiting, reverse=True)
    # the table works on: entries go in and are found again
    table.apply([n + (verdict,) for n in nets[:10]])
    assert table.get(*nets[3]) is verdict and len(table) == 10


def test_a_shrunk_big_table_gives_its_old_slots_back_in_slices() -> None:
    keep, doomed = Verdict(Action.DENY), Verdict(Action.DROP)
    table = BlockTable()
    nets = [net(16, 0x2001_0DB8 << 96 | i, 128) for i in range(200_000)]
    table.apply([n + (keep if i < 100 else doomed,) for i, n in enumerate(nets)])
    table.apply([n + (None,) for n in nets[100:]])   # under 1/8 full: shrunk
    waiting = table.release(1 << 20)
    assert waiting > 0
    assert table.release(1 << 40) == 0
    assert len(table) == 100 and table.get(*nets[42]) is keep and table.get(*nets[142]) is None
    for bad in (0, -1):
        with pytest.raises(ValueError):
            table.release(bad)
        with pytest.raises(ValueError):
            acl_module.DictBlockTable().release(bad)
    with pytest.raises(TypeError):
        table.release("1")
    assert acl_module.DictBlockTable().release(1 << 20) == 0


# ------------------------------------------------------------------ the packet loop

WALL = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=WALL)
REQUEST = bytes((0x23, 0, 6)) + bytes(45)


@pytest.mark.skipif(not fastlane.available(), reason="compiled loop unavailable")
def test_the_packet_loop_decides_over_the_block_table_as_python_does() -> None:
    """IPv4 and IPv6 sources under blocklist entries only (so the lane must see the
    BlockTable's IPv6 lengths to look IPv6 sources up), a verdict that expires and
    uncovers the configuration's entry, and a blocklist that changes mid-run."""
    def entry(cidr: str, action: Action, expires_ns: int | None = None,
              origin: str = "manual") -> AclEntry:
        return AclEntry(ipaddress.ip_network(cidr), action, origin, "", expires_ns)

    pipelines = []
    config = (entry("192.0.2.0/24", Action.DENY, origin="config"),)
    for _ in range(2):
        pipeline = Pipeline(FilterPolicy(random_seed=3, deny_action=Action.DENY,
                                         kod_interval_s=4.0, source_rate=0.5, source_burst=4,
                                         acl=config),
                            Responder(CLOCK, WALL))
        pipeline.update_blocklist([entry("192.0.2.7/32", Action.DROP, WALL + 30 * NS_PER_S),
                                   entry("198.51.100.0/24", Action.DENY),
                                   entry("2001:db8:0:1::/64", Action.EXEMPT),
                                   entry("2001:db8:0:2::9/128", Action.DENY)])
        assert type(pipeline.acl.block_table) is BlockTable
        assert pipeline.acl.probes(16) == ()   # IPv6 in the blocklist layer alone
        pipelines.append(pipeline)
    reference, compiled = pipelines
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lane = fastlane.FastLane(sock, compiled)
    sources = [bytes((192, 0, 2, 7)), bytes((192, 0, 2, 8)), bytes((198, 51, 100, 5)),
               bytes((203, 0, 113, 1)),
               ipaddress.ip_address("2001:db8:0:1::5").packed,
               ipaddress.ip_address("2001:db8:0:2::9").packed,
               ipaddress.ip_address("2001:db8:0:2::8").packed]
    seen: dict[tuple[bytes, Reason], set[bool]] = {}
    try:
        now_ns = 10 * NS_PER_S
        for step in range(600):
            now_ns += NS_PER_S // 10
            if step == 300:   # the blocklist changes: 203.0.113.0/24 blocked, an entry goes
                for pipeline in pipelines:
                    pipeline.update_blocklist([entry("203.0.113.0/24", Action.DENY)],
                                              [ipaddress.ip_network("198.51.100.0/24")])
            source = sources[step % len(sources)]
            expected = reference.decide(REQUEST, source, 40_000, WALL + now_ns, now_ns)
            reason, reply, _, in_c = lane.decide_one(REQUEST, source, 40_000, WALL + now_ns,
                                                     now_ns)
            assert (reason, reply) == expected[:2], step
            assert compiled.snapshot() == reference.snapshot(), step
            seen.setdefault((source, Reason(reason)), set()).add(in_c)
    finally:
        sock.close()
    assert all(in_c == {True} for in_c in seen.values()), seen
    blocked, config, listed, later, exempt6, denied6, other6 = sources
    assert set(seen) >= {(blocked, Reason.BLOCKLISTED), (blocked, Reason.ACL_DENY),
                         (config, Reason.ACL_DENY), (listed, Reason.BLOCKLISTED),
                         (listed, Reason.ANSWERED), (later, Reason.ANSWERED),
                         (later, Reason.BLOCKLISTED), (exempt6, Reason.ANSWERED),
                         (denied6, Reason.BLOCKLISTED), (other6, Reason.ANSWERED)}, sorted(seen)


@pytest.mark.skipif(not fastlane.available(), reason="compiled loop unavailable")
def test_a_block_table_that_is_not_one_is_refused() -> None:
    pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL))
    acl = pipeline.acl
    acl.block_table = {}  # type: ignore[assignment]
    acl.generation += 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        lane = fastlane.FastLane(sock, pipeline)
        with pytest.raises(TypeError, match="block_table must be a BlockTable or None"):
            lane.decide_one(REQUEST, bytes((192, 0, 2, 1)), 40_000, WALL, NS_PER_S)
        acl.block_table = BlockTable()
        acl.generation += 1
        reason = lane.decide_one(REQUEST, bytes((192, 0, 2, 1)), 40_000, WALL, NS_PER_S)[0]
        assert reason == Reason.ANSWERED
    finally:
        sock.close()
