"""Blocklist changes reaching the access list of a pipeline that holds 100 000 entries,
and (end to end) a server's LiveBlocklist over a store of 100 000 or a million rows.

The packet loop waits while a change is applied (the blocklist timer runs on
the server's loop), so this is a stall per ``block add``, ``block remove`` or
expiry. ``Pipeline.update_blocklist`` writes only the entries that changed
(``guardntp/filter/acl.py``); before it, every change rebuilt the whole table
(``rebuild``, here for comparison). The ``import`` benchmark is the first load
of 100 000 entries into an empty list. ``test_stall_...`` times the whole tick
that picks a change up from the file: ``LiveBlocklist.refresh`` after another
connection's ``upsert`` or ``remove``. Results are in docs/blocklist.md.

``python bench/test_blocklist_apply.py [SIZE] [--ttl] [--traced] [--ipv6]`` measures the
memory a server holds per entry instead (not a benchmark: a process of its own).
"""

from __future__ import annotations

import gc
import ipaddress
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from benchutil import MILLION, make_pipeline

from guardntp.blocklist.auto import parse_auto_policy
from guardntp.blocklist.entries import BlockEntry
from guardntp.blocklist.live import RELEASE_BYTES, SWEEP_SLOTS, LiveBlocklist, setup_blocklist
from guardntp.blocklist.store import BlockStore
from guardntp.filter.acl import AccessList, AclEntry, Action
from guardntp.filter.pipeline import Pipeline

SIZE = 100_000
ONE = AclEntry(ipaddress.ip_network("198.51.100.7/32"), Action.DROP, "manual", "flood")
CONFIG = (AclEntry(ipaddress.ip_network("192.0.2.0/24"), Action.DROP),
          AclEntry(ipaddress.ip_network("203.0.113.0/24"), Action.EXEMPT))


def feed(size: int) -> list[AclEntry]:
    """/32s in 10.0.0.0/8 and, one in four, /24s from 11.0.0.0 on: two prefix lengths."""
    return [AclEntry(ipaddress.IPv4Network(((10 << 24) + index, 32)) if index % 4 else
                     ipaddress.IPv4Network(((11 << 24) + (index << 8), 24)),
                     Action.DROP, "import", "feed", None) for index in range(size)]


@pytest.fixture(scope="module")
def entries() -> list[AclEntry]:
    return feed(SIZE)


@pytest.fixture(scope="module")
def loaded(entries: list[AclEntry]) -> Pipeline:
    """A pipeline with two [[acl]] entries and the 100 000 blocklist entries."""
    pipeline = make_pipeline(acl=CONFIG)
    pipeline.update_blocklist(entries)
    assert len(pipeline.acl) == SIZE + len(CONFIG)
    return pipeline


def test_add_one_entry_among_100k(benchmark, loaded: Pipeline) -> None:
    """``block add``: one entry handed over (its removal between rounds is not timed)."""
    def remove() -> None:
        loaded.update_blocklist(removed=[ONE.network])

    benchmark.pedantic(loaded.update_blocklist, args=([ONE],), setup=remove,
                       rounds=2000, warmup_rounds=10)
    assert loaded.acl.lookup(ONE.network.network_address.packed, 0) is loaded.acl.verdict_of(ONE)


def test_remove_one_entry_among_100k(benchmark, loaded: Pipeline) -> None:
    """``block remove`` or an expiry: one network handed over."""
    def add() -> None:
        loaded.update_blocklist([ONE])

    benchmark.pedantic(loaded.update_blocklist, kwargs={"removed": [ONE.network]},
                       setup=add, rounds=2000, warmup_rounds=10)
    assert loaded.acl.lookup(ONE.network.network_address.packed, 0) is None


def test_import_100k_into_an_empty_list(benchmark, entries: list[AclEntry]) -> None:
    """The first load (server start, a first ``block import``): every entry written."""
    pipelines: list[Pipeline] = []

    def fresh() -> None:
        pipelines[:] = [make_pipeline(acl=CONFIG)]

    def load() -> None:
        pipelines[0].update_blocklist(entries)

    benchmark.pedantic(load, setup=fresh, rounds=3)
    assert len(pipelines[0].acl) == SIZE + len(CONFIG)


@pytest.mark.parametrize("how", ["set_blocklist", "rebuild"])
def test_whole_list_handed_over_with_one_more_entry(benchmark, loaded: Pipeline,
                                                    entries: list[AclEntry], how: str) -> None:
    """For comparison. ``set_blocklist``: the whole list handed over and compared
    with what is there (one entry written). ``rebuild``: what every change cost
    before, a new table of every entry adopted in place of the old."""
    wanted = [*entries, ONE]
    acl = loaded.acl
    change: Callable[[], None]
    if how == "set_blocklist":
        def change() -> None:
            loaded.set_blocklist(wanted)
            loaded.update_blocklist(removed=[ONE.network])   # for the next round
    else:
        def change() -> None:
            acl.adopt(AccessList(list(CONFIG), wanted))
    benchmark.pedantic(change, rounds=3)
    assert len(acl) == SIZE + len(CONFIG) + (how == "rebuild")
    if how == "rebuild":
        loaded.update_blocklist(removed=[ONE.network])


# ------------------------------------------------------------------ end to end

#: Rounds of the end-to-end stall; each round also applies one change untimed
#: (its setup), which costs as much as the timed one when changes read every row.
STALL_ROUNDS = 30


class _NoTimers:
    def add_periodic(self, interval_s: float, callback: object) -> None:
        pass


def feed_rows(size: int, now_ns: int) -> Iterator[tuple[str, str, str, int, None, str]]:
    """The rows of :func:`feed` as the store holds them (cidr text written directly:
    formatting a million networks through ``ipaddress`` would double the setup)."""
    for index in range(size):
        if index % 4:
            address = (10 << 24) + index
            cidr = f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}/32"
        else:
            address = (11 << 24) + (index << 8)
            cidr = f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.0/24"
        yield cidr, "drop", "feed", now_ns, None, "import"


@pytest.fixture(scope="module", params=[SIZE, MILLION], ids=["100k", "1M"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LiveBlocklist, BlockStore, int]]:
    """A store of ``param`` rows applied by a server's LiveBlocklist over a real
    pipeline, and a second connection to write to it (as ``guardntp block`` does)."""
    size = request.param
    if size > SIZE and request.config.getoption("benchmark_disable"):
        # The smoke run (CI) has the 100k store go through the same code; the million
        # takes ~45 s to write and load, for no timing.
        pytest.skip("the 1M store is built only when benchmarks are timed")
    state = tmp_path_factory.mktemp(f"state-{size}")
    writer = BlockStore.in_state_dir(state)
    now_ns = time.time_ns()
    with writer.transaction() as db:      # one transaction: ~25 s for the million
        db.executemany("INSERT INTO blocks (cidr, action, reason, created_ns, expires_ns, "
                       "origin) VALUES (?, ?, ?, ?, ?, ?)", feed_rows(size, now_ns))
    writer.purge_expired(now_ns)          # what every write does on the way out
    live = setup_blocklist(state, make_pipeline(acl=CONFIG), _NoTimers(),
                           parse_auto_policy({}))
    assert live.active_entries == size
    live.refresh()                        # the first tick's purge, out of the rounds
    # As the server does every second (guardntp/server.py, GC_FREEZE_S): a collection
    # set off by a change must not walk the million entries, here no more than there.
    gc.freeze()
    try:
        yield live, writer, size
    finally:
        gc.unfreeze()
        writer.close()
        live.close()


def _applied(live: LiveBlocklist, now_ns: int | None = None) -> bool:
    found = live.pipeline.acl.lookup(ONE.network.network_address.packed,
                                     time.time_ns() if now_ns is None else now_ns)
    return found is not None and found.origin == "manual"


@pytest.mark.parametrize("change", ["add", "remove"])
def test_stall_of_one_change_from_another_connection(
        benchmark, served: tuple[LiveBlocklist, BlockStore, int], change: str) -> None:
    """``block add`` / ``block remove`` through a second connection, then the
    server's next tick (``LiveBlocklist.refresh``, timed) picking it up: what the
    packet loop waits for. The opposite change is written and applied in the setup."""
    live, writer, size = served
    entry = BlockEntry(ONE.network, "drop", "flood", time.time_ns(), None, "manual")

    def add() -> None:
        writer.upsert([entry], time.time_ns())

    def remove() -> None:
        writer.remove(ONE.network, time.time_ns())

    undo, do = (remove, add) if change == "add" else (add, remove)

    def setup() -> None:
        undo()
        live.refresh()
        do()

    benchmark.pedantic(live.refresh, setup=setup, rounds=STALL_ROUNDS, warmup_rounds=1)
    assert _applied(live) is (change == "add")
    assert live.active_entries == size + (change == "add")


#: The import: this many new /24s in 60.0.0.0/8, outside the feed.
IMPORT = 10_000


def test_stall_of_an_import(benchmark, served: tuple[LiveBlocklist, BlockStore, int]) -> None:
    """``block import`` of 10 000 new entries, picked up by the next tick."""
    live, writer, size = served
    now_ns = time.time_ns()
    entries = [BlockEntry(ipaddress.IPv4Network((60 << 24 | index << 8, 24)), "drop", "scan",
                          now_ns, None, "import") for index in range(IMPORT)]

    def remove() -> None:
        with writer.transaction() as db:
            db.execute("DELETE FROM blocks WHERE reason = 'scan'")
        live.refresh()

    def setup() -> None:
        remove()                             # gone again and applied, out of the timing
        gc.freeze()
        writer.upsert(entries, time.time_ns())

    benchmark.pedantic(live.refresh, setup=setup, rounds=10, warmup_rounds=1)
    assert live.active_entries == size + IMPORT
    remove()
    assert live.active_entries == size


def test_stall_of_an_expiry(benchmark, served: tuple[LiveBlocklist, BlockStore, int]) -> None:
    """An entry's TTL runs out: the tick that sees it lapse (no row read) and takes the
    first bounded step of sweeping it out of the table."""
    live, writer, size = served
    clock = [time.time_ns()]

    def setup() -> None:
        writer.upsert([BlockEntry(ONE.network, "drop", "flood", clock[0],
                                  clock[0] + 1_000_000_000, "manual")], time.time_ns())
        live.refresh()
        assert live.active_entries == size + 1
        clock[0] += 2_000_000_000            # the server's clock: past the TTL

    live.wall_ns = lambda: clock[0]
    try:
        benchmark.pedantic(live.refresh, setup=setup, rounds=STALL_ROUNDS, warmup_rounds=1)
    finally:
        live.wall_ns = time.time_ns
    assert live.active_entries == size and not _applied(live, clock[0])


@pytest.mark.parametrize("size", [SIZE, MILLION], ids=["100k", "1M"])
def test_worst_tick_of_a_mass_expiry(benchmark, request: pytest.FixtureRequest,
                                     size: int) -> None:
    """Every entry lapses at once (an import with one TTL): the server's ticks that
    sweep them out and give the emptied table's memory back, as LiveBlocklist.refresh
    makes them (``expire_blocklist``, then ``release_blocklist_memory``). Timed: the
    whole sweep; ``worst_tick_ms`` (in the JSON's extra_info, and printed) is the
    longest single tick, the packet loop's stall."""
    if size > SIZE and request.config.getoption("benchmark_disable"):
        pytest.skip("the million is loaded only when benchmarks are timed")
    expires_ns = 1_000
    entries = [AclEntry(ipaddress.IPv4Network(((10 << 24) + index, 32)), Action.DROP,
                        "import", "feed", expires_ns) for index in range(size)]
    pipelines: list[Pipeline] = []
    worst: list[float] = []

    def load() -> None:
        pipeline = make_pipeline()
        pipeline.update_blocklist(entries)
        pipelines[:] = [pipeline]

    def sweep() -> None:
        pipeline, longest, ticks = pipelines[0], 0.0, 0
        while ticks < 10_000:
            started = time.perf_counter()
            left = pipeline.expire_blocklist(expires_ns, SWEEP_SLOTS)
            waiting = pipeline.release_blocklist_memory(RELEASE_BYTES)
            longest = max(longest, time.perf_counter() - started)
            ticks += 1
            if left == 0 and waiting == 0 and len(pipeline.acl.block_table) == 0:
                break
        worst.append(longest)

    benchmark.pedantic(sweep, setup=load, rounds=3 if size == SIZE else 1)
    benchmark.extra_info["worst_tick_ms"] = round(max(worst) * 1e3, 3)
    print(f"\n{size} entries lapsing at once: worst tick {max(worst) * 1e3:.3f} ms")
    assert len(pipelines[0].acl.block_table) == 0


def test_stall_of_a_whole_read(benchmark, served: tuple[LiveBlocklist, BlockStore, int]
                               ) -> None:
    """What every change cost before the change log, and still costs when the log
    cannot say what changed: here a writer that trimmed it past the server's last
    change (two changes, a log of one). Every row read and compared."""
    live, writer, size = served
    entry = BlockEntry(ONE.network, "drop", "flood", time.time_ns(), None, "manual")

    def setup() -> None:
        writer.keep_changes = 1
        try:
            writer.upsert([entry], time.time_ns())
            writer.remove(ONE.network, time.time_ns())
        finally:
            writer.keep_changes = BlockStore.keep_changes
        # What is timed is a whole read: the log cannot say what changed.
        assert live.store.read_changes(live._position) is None   # type: ignore[arg-type]

    benchmark.pedantic(live.refresh, setup=setup, rounds=3, warmup_rounds=1)
    assert live.active_entries == size and not _applied(live)


# ------------------------------------------------------------------ memory (not a benchmark)

def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux: KiB


def ipv6_rows(size: int, now_ns: int) -> Iterator[tuple[str, str, str, int, None, str]]:
    """IPv6 /128s from 2001:db8:: on: the longest networks, the widest slots."""
    for index in range(size):
        address = ipaddress.IPv6Address((0x2001_0DB8 << 96) + index * 0x1_0001)
        yield f"{address}/128", "drop", "feed", now_ns, None, "import"


def measure_memory(size: int, ttl: bool, traced: bool, ipv6: bool = False) -> None:
    """Bytes per entry a server holds for ``size`` blocklist entries (IPv4 /32s and
    /24s, or with ``ipv6`` IPv6 /128s): the process's resident set before and after
    the first load, and (``traced``) the Python objects still allocated once it is
    done, split into the LiveBlocklist's own (freed when its attributes go) and the
    access list's."""
    state = Path(tempfile.mkdtemp(prefix="guardntp-bench-"))
    try:
        writer = BlockStore.in_state_dir(state)
        now_ns = time.time_ns()
        expires_ns = now_ns + 86_400 * 1_000_000_000 if ttl else None
        with writer.transaction() as db:
            db.executemany("INSERT INTO blocks (cidr, action, reason, created_ns, "
                           "expires_ns, origin) VALUES (?, ?, ?, ?, ?, ?)",
                           (row[:4] + (expires_ns, row[5]) for row in
                            (ipv6_rows if ipv6 else feed_rows)(size, now_ns)))
        writer.purge_expired(now_ns)
        writer.close()
        pipeline = make_pipeline(acl=CONFIG)
        gc.collect()
        if traced:
            tracemalloc.start()
        rss = _rss_bytes()
        peak = max(rss, _peak_rss_bytes())
        base = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        live = setup_blocklist(state, pipeline, _NoTimers(), parse_auto_policy({}))
        took = time.perf_counter() - started
        gc.collect()
        peak = _peak_rss_bytes() - rss if _peak_rss_bytes() > peak else 0
        rss = _rss_bytes() - rss
        print(f"{size} entries{' with a TTL' if ttl else ''}: {live.active_entries} active, "
              f"loaded in {took:.1f} s")
        print(f"  resident set grew {rss / size:.0f} B an entry (at its peak, during the "
              f"load: {peak / size:.0f} B)")
        if not traced:
            return
        held = tracemalloc.get_traced_memory()[0] - base
        store = live.store
        vars(live).clear()            # what only the LiveBlocklist holds goes now
        gc.collect()
        filter_share = tracemalloc.get_traced_memory()[0] - base
        print(f"  Python objects: {held / size:.0f} B an entry, of which the "
              f"LiveBlocklist's own {(held - filter_share) / size:.0f} B and the "
              f"access list's (entries, networks, tables) {filter_share / size:.0f} B")
        store.close()
    finally:
        shutil.rmtree(state)


if __name__ == "__main__":
    # python bench/test_blocklist_apply.py [SIZE] [--ttl] [--traced] [--ipv6]
    arguments = sys.argv[1:]
    measure_memory(int(next((a for a in arguments if a.isdigit()), MILLION)),
                   "--ttl" in arguments, "--traced" in arguments, "--ipv6" in arguments)
