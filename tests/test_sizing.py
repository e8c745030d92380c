"""The sizing script behind docs/operations.md still runs and measures something real."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_measure_script_reports_memory_per_source_and_speeds() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "contrib" / "sizing" / "measure.py"), "--sources", "3000",
         "--packets", "3000", "--socket-loop", "--json"],
        capture_output=True, text=True, timeout=120, check=True, cwd=REPO)
    report = json.loads(result.stdout)
    shared, own = report["memory_shared_prefixes"], report["memory_own_prefix"]
    assert shared["sources"] == own["sources"] == 3000
    assert own["prefixes"] == 3000 and shared["prefixes"] == 12
    # A record (12 items) plus its key and table slot: hundreds of bytes, not tens
    # or tens of thousands; a source with its own prefix bucket costs more.
    assert 150 < shared["bytes_per_source"] < 2000
    assert own["bytes_per_source"] > shared["bytes_per_source"]
    assert all(rate > 1000 for rate in report["decisions_per_second"].values())
    loop = report["socket_loop"]
    assert loop["replies"] > 2000 and loop["server_cpu_s"] > 0
