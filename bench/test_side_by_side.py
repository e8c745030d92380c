"""Smoke test of the side-by-side harness: one short round, both servers, real counters.

It checks the tooling (namespace, nftables counters, generator, both servers,
the report), not speed: the figures of a 10-second run on a busy machine mean
nothing. Skipped without root or the tools.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "side_by_side.py"
TOOLS = ("unshare", "nft", "gcc", "taskset", "chronyd", "ip")


@pytest.mark.skipif(os.geteuid() != 0 or any(shutil.which(tool) is None for tool in TOOLS)
                    or (os.cpu_count() or 1) < 2,
                    reason="needs 2 CPUs, root, unshare, nft, gcc, taskset, ip and chronyd")
def test_one_quick_round_measures_both_servers(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--quick", "--max-steps", "1",
         "--json", str(report)],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    runs = {run["server"]: run for run in data["runs"]}
    assert set(runs) == {"chronyd", "guardntp"}
    for run in runs.values():
        double = run["double"]
        assert double["offered"] > 0 and double["answered"] > 0
        # Counted by nftables and seen by the generator: the two must roughly agree.
        assert double["received"] <= double["answered"] * 1.01 + 10
    assert "RATIO guardntp/chronyd" in result.stdout
    assert data["machine"]["nproc"] >= 1
