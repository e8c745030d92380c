"""Fixtures for the in-process benchmarks (``pytest bench/``; CI: ``--benchmark-disable``).

With ``--benchmark-disable`` every benchmark body runs once, so the whole of
``bench/`` is a fast smoke test; the million-source tables are still built (in
about two seconds: records are inserted directly, not packet by packet).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import MILLION, make_pipeline, source_address  # noqa: E402

from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.reference import new_record  # noqa: E402
from guardntp.timestamps import NS_PER_S  # noqa: E402


@pytest.fixture(scope="session")
def million_addresses() -> list[bytes]:
    return [source_address(index) for index in range(MILLION)]


@pytest.fixture(scope="session")
def million_pipeline(million_addresses: list[bytes]) -> Pipeline:
    """A pipeline already tracking a million sources, all with full buckets."""
    return build_million_pipeline(million_addresses)


@pytest.fixture
def own_million_pipeline(million_addresses: list[bytes]) -> Pipeline:
    """The same, for one test alone (its clock and global budget are its own)."""
    return build_million_pipeline(million_addresses)


def build_million_pipeline(million_addresses: list[bytes], drained: bool = False,
                           **policy: object) -> Pipeline:
    """A million tracked sources: buckets full, or (``drained``) emptied far ahead."""
    pipeline = make_pipeline(max_sources=1 << 20, **policy)
    start = time.monotonic_ns() - 100 * NS_PER_S
    tat = start + 10**6 * NS_PER_S if drained else start
    insert = pipeline.sources.insert
    for packed in million_addresses:
        record = new_record(start, "ntpv4", 40000)
        record[0] = tat
        insert(packed, record)
    return pipeline
