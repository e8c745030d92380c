"""The nftables export, loaded with ``nft -f`` in a private network namespace, really drops.

Inside ``unshare -n`` (a namespace with only ``lo``, gone when the test ends) a
guardntp server listens on 127.0.0.1:123 and [::1]:123. Queries come from
127.0.0.1 and 127.0.0.2 (any 127/8 address is local on ``lo``) and from ::1 and
fd00::2 (added to ``lo``). The blocklist that is exported lives in a *different*
state directory from the server's, so the server itself knows nothing of it:
whatever stops the queries is the kernel firewall alone.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import needs_netns, run_in_netns

NFT = shutil.which("nft") or "/usr/sbin/nft"   # root's PATH has /usr/sbin; CI's may not

pytestmark = [pytest.mark.netns, pytest.mark.slow, needs_netns,
              pytest.mark.skipif(not Path(NFT).exists(),
                                 reason="nft not installed (Debian package nftables)")]

SCENARIO = textwrap.dedent(r"""
    import json, socket, subprocess, sys, time
    from pathlib import Path
    from guardntp import client

    server_state, blocklist_state, work = (Path(p) for p in sys.argv[1:4])
    NFT = sys.argv[4]
    guardntp = [sys.executable, "-m", "guardntp"]

    def query(source, timeout=0.5):
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        target = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        pending = client.build_request(0x1111_2222_3333_4444)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.sendto(pending.wire, (target, 123))
            try:
                sock.recv(1024)
                return "time"
            except TimeoutError:
                return "silent"

    def everyone():
        return {source: query(source) for source in ("127.0.0.1", "127.0.0.2", "::1", "fd00::2")}

    def run(*args):
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise SystemExit(f"{args} failed: {done.stderr}")
        return done.stdout

    def counters():
        table = json.loads(run(NFT, "-j", "list", "table", "inet", "guardntp"))
        found = {}
        for item in table["nftables"]:
            rule = item.get("rule")
            if rule:
                expr = rule["expr"]
                name = next(e["match"]["right"] for e in expr if "match" in e
                            and str(e["match"]["right"]).startswith("@"))
                found[name] = next(e["counter"]["packets"] for e in expr if "counter" in e)
        return found

    def elements():
        table = json.loads(run(NFT, "-j", "list", "table", "inet", "guardntp"))
        return {item["set"]["name"]: item["set"].get("elem", [])
                for item in table["nftables"] if "set" in item}

    run("ip", "-6", "addr", "add", "fd00::2/128", "dev", "lo", "nodad")
    log = open(work / "server.log", "w")
    server = subprocess.Popen(guardntp + [
        "serve", "--clock", "local", "--listen", "127.0.0.1:123", "--listen", "[::1]:123",
        "--state-dir", str(server_state), "--set", "filter.source_rate=1000",
        "--set", "filter.source_burst=1000"], stdout=log, stderr=subprocess.STDOUT)
    result = {}
    try:
        for _ in range(100):
            if query("127.0.0.1", 0.2) == "time":
                break
            time.sleep(0.1)
        result["before"] = everyone()
        result["packets_before"] = json.loads(run(*guardntp, "stats", "--json", "--state-dir",
                                                  str(server_state)))["packets"]

        run(*guardntp, "block", "add", "127.0.0.2", "--ttl", "1h", "--reason", "flood",
            "--state-dir", str(blocklist_state))
        run(*guardntp, "block", "add", "fd00::2/128", "--state-dir", str(blocklist_state))
        # Overlapping entries that outlive each other need a nested set: load them too.
        run(*guardntp, "block", "add", "10.0.0.0/8", "--ttl", "1h",
            "--state-dir", str(blocklist_state))
        run(*guardntp, "block", "add", "10.1.0.0/16", "--state-dir", str(blocklist_state))
        rules = work / "guardntp.nft"
        run(*guardntp, "block", "export", "--format", "nft", "--output", str(rules),
            "--state-dir", str(blocklist_state))
        run(NFT, "-f", str(rules))
        run(NFT, "-f", str(rules))   # loading a newer export again replaces, never fails
        result["elements"] = elements()
        result["during"] = everyone()
        result["counters"] = counters()
        clients = json.loads(run(*guardntp, "clients", "--json", "--state-dir",
                                 str(server_state)))
        result["server_saw"] = {row["source"]: row["requests"] for row in clients["clients"]}
        stats = json.loads(run(*guardntp, "stats", "--json", "--state-dir", str(server_state)))
        result["server_packets"] = stats["packets"]

        run(NFT, "delete", "table", "inet", "guardntp")
        result["after"] = everyone()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(json.dumps(result))
""")


def test_nft_export_drops_listed_sources_before_the_server(tmp_path: Path) -> None:
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    outcome = run_in_netns(
        f"{sys.executable} {script} {tmp_path / 'server-state'} {tmp_path / 'blocklist-state'} "
        f"{tmp_path} {NFT}", timeout_s=90)
    assert outcome.returncode == 0, outcome.stderr + (tmp_path / "server.log").read_text()
    result = json.loads(outcome.stdout.strip().splitlines()[-1])

    everyone_answered = {"127.0.0.1": "time", "127.0.0.2": "time", "::1": "time",
                         "fd00::2": "time"}
    assert result["before"] == everyone_answered
    assert result["during"] == {"127.0.0.1": "time", "127.0.0.2": "silent", "::1": "time",
                                "fd00::2": "silent"}
    assert result["after"] == everyone_answered

    # The kernel counted the drops ...
    assert result["counters"]["@blocklist_v4"] == 1
    assert result["counters"]["@blocklist_v6"] == 1
    # ... and the server never saw them: one request each, from before the rules, and
    # while the rules stood it counted only the two unblocked requests.
    assert result["server_saw"]["127.0.0.2"] == 1
    assert result["server_saw"]["fd00::/64"] == 1   # IPv6 sources are tracked by /64
    assert result["server_packets"] - result["packets_before"] == 2

    elements = result["elements"]
    v4 = {json.dumps(e, sort_keys=True) for e in elements["blocklist_v4"]}
    timed = [e["elem"] for e in elements["blocklist_v4"] if isinstance(e, dict) and "elem" in e]
    assert any(e["val"] == "127.0.0.2" and 3500 < e["timeout"] <= 3600 for e in timed), v4
    assert elements["blocklist_v4_nested1"], "the outliving /16 is in a nested set"
    assert elements["blocklist_v6"] == ["fd00::2"]
