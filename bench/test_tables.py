"""Per-source tables with a million tracked sources: the filter's table against cachetools.

The project brief named cachetools for bucket tables; the hot path needs one
lookup per packet, so this decides. ``BucketTable`` keeps an ``OrderedDict``
(lookups are plain ``dict`` lookups; the order is touched only on admission
and eviction), cachetools' ``LRUCache`` reorders on every read and
``TTLCache`` also checks expiry. Results are in docs/benchmarks.md. At the end, the
access list's longest-prefix lookup: compiled against its reference model.
"""

from __future__ import annotations

import ipaddress
import random

import cachetools
import pytest
from benchutil import MILLION, make_pipeline, source_address

from guardntp.filter.acl import AccessList, AclEntry, Action, Match, longest_match
from guardntp.filter.reference import new_record


@pytest.fixture(scope="module")
def filled(million_addresses):
    """The same million keys, each mapping to a fresh source record, in every table."""
    pipeline = make_pipeline(max_sources=MILLION)
    table = pipeline.sources
    plain: dict[bytes, list[object]] = {}
    lru: cachetools.LRUCache[bytes, list[object]] = cachetools.LRUCache(maxsize=MILLION)
    ttl: cachetools.TTLCache[bytes, list[object]] = cachetools.TTLCache(maxsize=MILLION,
                                                                        ttl=3600)
    for packed in million_addresses:
        record = new_record(0, "ntpv4", 40000)
        table.insert(packed, record)
        plain[packed] = lru[packed] = ttl[packed] = record
    return {"buckettable": pipeline.sources, "dict": plain, "lru": lru, "ttl": ttl}


def lookups(get, addresses):
    state = {"next": 0}

    def one():
        index = state["next"]
        state["next"] = (index + 7919) % len(addresses)   # stride: no cache-friendly order
        return get(addresses[index])

    return one


@pytest.mark.parametrize("kind", ["baseline", "buckettable", "dict", "lru", "ttl"])
def test_lookup_among_a_million(benchmark, filled, million_addresses, kind):
    """``baseline`` times the harness alone (next key, a call): subtract it from the rest."""
    if kind == "baseline":
        get = bool
    else:
        table = filled[kind]
        get = table.records.get if kind == "buckettable" else table.get
    assert benchmark(lookups(get, million_addresses)) is not None


@pytest.mark.parametrize("kind", ["buckettable", "lru", "ttl"])
def test_admit_a_newcomer_into_a_full_table(benchmark, kind):
    """Churn: every packet a new source, the table full (spoofed flood)."""
    size = 100_000
    state = {"next": size}
    if kind == "buckettable":
        table = make_pipeline(max_sources=size).sources
        for index in range(size):
            table.insert(source_address(index), new_record(0, "ntpv4", 40000))

        def admit() -> object:
            state["next"] += 1
            return table.admit(source_address(state["next"]), new_record(0, "ntpv4", 40000),
                               1)
    else:
        cache: cachetools.Cache[bytes, list[object]] = (
            cachetools.LRUCache(maxsize=size) if kind == "lru"
            else cachetools.TTLCache(maxsize=size, ttl=3600))
        for index in range(size):
            cache[source_address(index)] = new_record(0, "ntpv4", 40000)

        def admit() -> object:
            state["next"] += 1
            cache[source_address(state["next"])] = new_record(0, "ntpv4", 40000)
            return True

    assert benchmark(admit) is not False


@pytest.fixture(scope="module")
def blocklisted() -> AccessList:
    """100,000 blocklist entries, IPv4, on three prefix lengths (/32 mostly, /24, /16)."""
    rng = random.Random(1)
    entries = []
    for _ in range(100_000):
        prefixlen = rng.choice((32, 32, 32, 24, 16))
        address = rng.getrandbits(32) >> (32 - prefixlen) << (32 - prefixlen)
        entries.append(AclEntry(ipaddress.IPv4Network((address, prefixlen)), Action.DROP,
                                "import"))
    return AccessList((), entries)


@pytest.mark.parametrize("kind", ["compiled", "reference"])
def test_access_list_lookup_among_100k_entries(benchmark, blocklisted, kind):
    """One lookup of a random address (mostly no entry: every length probed), through
    Python: the compiled ``AccessList.lookup`` (which the packet loop calls from C,
    without the call's cost) against its reference model ``acl.longest_match``."""
    rng = random.Random(2)
    addresses = [rng.getrandbits(32).to_bytes(4, "big") for _ in range(4096)]
    probes, block = blocklisted.probes(4), blocklisted.block_table
    state = {"next": 0}
    lookup = blocklisted.lookup

    def one() -> Match | None:
        index = state["next"] = (state["next"] + 1) & 4095
        packed = addresses[index]
        return lookup(packed, 0) if kind == "compiled" else longest_match(probes, block, packed, 0)

    benchmark(one)
    assert all(blocklisted.lookup(a, 0) is longest_match(probes, block, a, 0)
               for a in addresses)
