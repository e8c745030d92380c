"""Blocklist changes reaching the access list of a pipeline that holds 100 000 entries.

The packet loop waits while a change is applied (the blocklist timer runs on
the server's loop), so this is a stall per ``block add``, ``block remove`` or
expiry. ``Pipeline.update_blocklist`` writes only the entries that changed
(``guardntp/filter/acl.py``); before it, every change rebuilt the whole table
(``rebuild``, here for comparison). The ``import`` benchmark is the first load
of 100 000 entries into an empty list. Results are in docs/blocklist.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from benchutil import make_pipeline

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
    assert loaded.acl.lookup(ONE.network.network_address.packed, 0) is ONE


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
