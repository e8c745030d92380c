"""Privilege drop: after binding, the server is --user for good; the socket still works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, guardntp_server, needs_netns, run_in_netns

from guardntp import client
from guardntp.privileges import PrivilegeError, resolve_identity, status_ids

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


def test_resolve_identity_by_name_number_and_group() -> None:
    nobody = resolve_identity("nobody")
    assert nobody.uid == 65534
    assert resolve_identity("nobody", "0").gid == 0
    assert resolve_identity("65534").uid == 65534
    assert resolve_identity("4242", "4343") == resolve_identity("4242", "4343")
    assert resolve_identity("4242").gid == 4242  # a bare number: its own group
    with pytest.raises(PrivilegeError, match="no such user"):
        resolve_identity("no-such-user-guardntp")
    with pytest.raises(PrivilegeError, match="no such group"):
        resolve_identity("nobody", "no-such-group-guardntp")


DROP_SCRIPT = r"""
import json, os, socket, sys
from guardntp.privileges import drop_privileges, resolve_identity
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 0))
drop_privileges(resolve_identity("nobody"))
result = {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
          "groups": os.getgroups()}
for name, attempt in [("setuid0", lambda: os.setuid(0)), ("seteuid0", lambda: os.seteuid(0)),
                      ("setgid0", lambda: os.setgid(0))]:
    try:
        attempt()
        result[name] = "succeeded"
    except PermissionError:
        result[name] = "refused"
low = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    low.bind(("127.0.0.1", 80))
    result["bind80"] = "succeeded"
except PermissionError:
    result["bind80"] = "refused"
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.settimeout(2)
probe.sendto(b"still here", server.getsockname())
result["socket"] = server.recvfrom(64)[0].decode()
result["no_new_privs"] = [line.split()[1] for line in open("/proc/self/status")
                          if line.startswith("NoNewPrivs:")][0]
print(json.dumps(result))
"""


@needs_root
def test_after_the_drop_root_cannot_be_regained_and_the_socket_still_works() -> None:
    out = subprocess.run([sys.executable, "-c", DROP_SCRIPT], capture_output=True, text=True,
                         timeout=30, cwd=REPO, check=True).stdout
    result = json.loads(out)
    assert result["ids"] == [65534] * 4
    assert result["groups"] == []
    assert (result["setuid0"], result["seteuid0"], result["setgid0"]) == ("refused",) * 3
    assert result["bind80"] == "refused"
    assert result["socket"] == "still here"
    assert result["no_new_privs"] == "1"


def _all_tasks(pid: int) -> list[dict[str, list[int]]]:
    return [status_ids(int(task)) for task in os.listdir(f"/proc/{pid}/task")]


@needs_root
def test_serve_user_drops_every_thread_and_still_answers_and_reloads(shared_dir: Path,
                                                                     tmp_path: Path) -> None:
    import socket

    config = shared_dir / "guardntp.toml"
    config.write_text("[filter]\nsource_burst = 100\n")
    config.chmod(0o644)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    with guardntp_server(tmp_path, "-c", str(config), "--user", "nobody",
                         "--state-dir", str(shared_dir / "state"),
                         "--metrics", f"127.0.0.1:{metrics_port}") as server:
        tasks = _all_tasks(server.process.pid)
        assert len(tasks) >= 2  # the main loop and the metrics thread
        for ids in tasks:
            assert ids["Uid"] == [65534] * 4
            assert ids["Gid"] == [65534] * 4
            assert ids["Groups"] == []
            assert ids["CapEff"] == [0] and ids["CapPrm"] == [0]
        assert client.exchange("127.0.0.1", server.port, timeout_s=2).packet.stratum == 10
        assert (shared_dir / "state").stat().st_uid == 65534
        assert "running as user nobody (uid 65534, gid 65534)" in server.log()
        # The config file is re-read as nobody.
        config.write_text("[filter]\nsource_burst = 50\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "burst 50" in server.log()


NETNS_SCRIPT = r"""
set -u
{python} -m guardntp serve --listen 127.0.0.1:123 --user nobody --state-dir {state} \
    >{log} 2>&1 &
pid=$!
for i in $(seq 1 100); do
    {python} -m guardntp query 127.0.0.1:123 >/dev/null 2>&1 && break
    sleep 0.1
done
{python} -m guardntp query 127.0.0.1:123 | head -1
grep -E '^(Uid|Gid|CapEff):' /proc/$pid/status
kill $pid
wait $pid
echo "exit $?"
"""


@needs_root
@needs_netns
@pytest.mark.netns
def test_port_123_is_bound_then_the_server_runs_as_nobody(shared_dir: Path) -> None:
    state = shared_dir / "state"
    log = shared_dir / "server.log"
    script = NETNS_SCRIPT.format(python=sys.executable, state=state, log=log)
    result = run_in_netns(script, timeout_s=60)
    out = result.stdout
    assert re.search(r"^server 127\.0\.0\.1:123: stratum 10", out, re.M), out + log.read_text()
    assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", out, re.M), out
    assert re.search(r"^Gid:\s+65534\s+65534\s+65534\s+65534$", out, re.M), out
    assert re.search(r"^CapEff:\s+0+$", out, re.M), out
    assert "exit 0" in out, out + log.read_text()


def test_a_non_root_process_cannot_switch_users() -> None:
    # As root: set only the effective uid (the interpreter's files stay readable, since
    # everything is imported first), then ask for another user.
    script = ("import os; from guardntp.privileges import PrivilegeError, drop_privileges, "
              "resolve_identity; daemon = resolve_identity('daemon')\n"
              "if os.geteuid() == 0: os.seteuid(65534)\n"
              "try: drop_privileges(daemon)\n"
              "except PrivilegeError as error: print(error)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, cwd=REPO, check=True)
    assert result.stdout.startswith("--user daemon: only root can change user (running as uid")
