"""Reload: SIGHUP (run from the loop) and ``Service.reload()`` apply new filter settings,
keep bucket state, and reject a bad file keeping the running configuration."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerProcess, free_udp_port, guardntp_server

from guardntp import client
from guardntp.cli import build_parser
from guardntp.commands.serve import build_config
from guardntp.config import Config
from guardntp.daemon.errors import ReloadRejected
from guardntp.daemon.service import Service
from guardntp.filter.reference import TAT
from guardntp.signals import DeferredSignals
from guardntp.verdicts import Reason

STRICT = """\
[filter]
source_rate = 0.01      # one request per 100 s
source_burst = {burst}
leak_one_in = 0         # no random answers: the test sees the bucket alone
kod_interval_s = 0      # a RATE KoD for every request over the limit
max_crowd = 1           # each query's new port must not count as another client
prefix_rate = {prefix_rate}
"""
LOOSE = """\
[filter]
source_rate = 1000
source_burst = 1000
leak_one_in = 0
kod_interval_s = 0
"""


def outcome(port: int) -> str:
    """"time", "kod" or "silence" for one request from 127.0.0.1."""
    try:
        client.exchange("127.0.0.1", port, timeout_s=1.0)
    except client.KissOfDeath:
        return "kod"
    except (OSError, client.BogusReply):
        return "silence"
    return "time"


def hup_and_wait(server: ServerProcess, marker: str, timeout_s: float = 10.0) -> str:
    """SIGHUP the server; return its log once ``marker`` appears one more time."""
    before = server.log().count(marker)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = server.log()
        if log.count(marker) > before:
            return log
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} after SIGHUP:\n{server.log()}")


def drain_until_kod(port: int, limit: int = 10) -> list[str]:
    results = []
    for _ in range(limit):
        results.append(outcome(port))
        if results[-1] == "kod":
            break
    return results


def test_a_limited_source_stays_limited_across_a_reload(tmp_path: Path) -> None:
    config = tmp_path / "guardntp.toml"
    config.write_text(STRICT.format(burst=3, prefix_rate=16.0))
    with guardntp_server(tmp_path, "-c", str(config)) as server:
        results = drain_until_kod(server.port)
        assert results[-1] == "kod" and len(results) <= 3  # the start-up probe took one
        config.write_text(STRICT.format(burst=3, prefix_rate=32.0))  # an unrelated change
        log = hup_and_wait(server, "reloaded ")
        assert "SIGHUP: reloading" in log
        # A fresh bucket would answer 3 requests; the kept one is still empty.
        assert [outcome(server.port) for _ in range(2)] == ["kod", "kod"]
        assert server.process.poll() is None


def test_a_reload_that_lowers_source_rate_takes_effect(tmp_path: Path) -> None:
    config = tmp_path / "guardntp.toml"
    config.write_text(LOOSE)
    with guardntp_server(tmp_path, "-c", str(config)) as server:
        assert [outcome(server.port) for _ in range(6)] == ["time"] * 6
        time.sleep(0.1)  # let the loose bucket (1 ms per request) refill: no debt carried
        config.write_text(STRICT.format(burst=2, prefix_rate=16.0))
        hup_and_wait(server, "reloaded ")
        # New bucket: 100 s per request, burst 2 -> two answers, then RATE KoD.
        assert [outcome(server.port) for _ in range(4)] == ["time", "time", "kod", "kod"]


def test_a_bad_file_is_rejected_and_the_running_configuration_kept(tmp_path: Path) -> None:
    config = tmp_path / "guardntp.toml"
    config.write_text(STRICT.format(burst=2, prefix_rate=16.0))
    with guardntp_server(tmp_path, "-c", str(config)) as server:
        assert drain_until_kod(server.port)[-1] == "kod"
        config.write_text(LOOSE.replace("source_rate = 1000", "source_rate = \"fast\""))
        log = hup_and_wait(server, "reload rejected")
        line = next(line for line in log.splitlines() if "reload rejected" in line)
        assert f"{config}:2: filter.source_rate: must be a number > 0" in line
        assert "Traceback" not in log
        # Still serving, still with the old (strict) limits.
        assert outcome(server.port) == "kod"
        assert server.process.poll() is None
        config.write_text(LOOSE)  # a good file afterwards is taken
        hup_and_wait(server, "reloaded ")


# ---------------------------------------------------------------- in process


def _service(tmp_path: Path, config_text: str) -> Service:
    path = tmp_path / "guardntp.toml"
    path.write_text(config_text)
    args = build_parser().parse_args([
        "serve", "-c", str(path), "--listen", f"127.0.0.1:{free_udp_port()}",
        "--state-dir", str(tmp_path / "state")])
    return Service(build_config(args), lambda: build_config(args))


REQUEST = bytes([0x23]) + bytes(47)  # NTPv4 client, mode 3
SOURCE = bytes([192, 0, 2, 7])


def test_service_reload_keeps_tables_and_records_and_applies_the_new_policy(
        tmp_path: Path) -> None:
    service = _service(tmp_path, STRICT.format(burst=2, prefix_rate=16.0))
    try:
        pipeline = service.pipeline
        now = 10**12
        reasons = [pipeline.decide(REQUEST, SOURCE, 40000, now, now + i)[0] for i in range(4)]
        assert reasons[:2] == [Reason.ANSWERED] * 2 and Reason.ANSWERED not in reasons[2:]
        record = pipeline.sources.records[SOURCE]
        tat_before = record[TAT]
        table = pipeline.sources
        (tmp_path / "guardntp.toml").write_text(STRICT.format(burst=5, prefix_rate=16.0))
        message = service.reload()
        assert "burst 5" in message
        assert pipeline.sources is table and table.records[SOURCE] is record
        assert record[TAT] == tat_before
        assert pipeline.compiled.source_limit.burst == 5
        assert service.operations.reloads == {"ok": 1, "rejected": 0}

        (tmp_path / "guardntp.toml").write_text("[filter]\nsource_burst = 0\n")
        with pytest.raises(ReloadRejected, match=r"guardntp.toml:2: filter.source_burst"):
            service.reload()
        assert pipeline.compiled.source_limit.burst == 5
        assert service.config.filter.source_burst == 5
        assert service.operations.reloads == {"ok": 1, "rejected": 1}
    finally:
        for sock in service.sockets:
            sock.close()


class _FakeLoop:
    def __init__(self) -> None:
        self.readers: list[tuple[socket.socket, Callable[[socket.socket], None]]] = []

    def add_reader(self, fileobj: socket.socket,
                   callback: Callable[[socket.socket], None]) -> None:
        self.readers.append((fileobj, callback))


def test_sighup_work_runs_from_the_loop_not_inside_the_handler() -> None:
    loop = _FakeLoop()
    signals = DeferredSignals(loop)
    calls: list[str] = []
    try:
        signals.on(signal.SIGHUP, lambda: calls.append("reload"))
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # the Python-level handler has run by now
        assert calls == []
        (wakeup, drain), = loop.readers
        readable, _, _ = select.select([wakeup], [], [], 1.0)
        assert readable == [wakeup]  # the loop's selector wakes up at once
        drain(wakeup)
        assert calls == ["reload"]
        drain(wakeup)  # nothing pending: nothing runs twice
        assert calls == ["reload"]
    finally:
        signals.close()


# ------------------------------------------------- one reload path, all or nothing

GOOD = STRICT.format(burst=2, prefix_rate=16.0)


@pytest.mark.parametrize("bad_part", [
    "kod_interval_s = nan",                         # refused by the core's checks
    "[blocklist]\nauto = \"maybe\"\n",              # refused by a feature's section
    "[control]\nenabled = 3\n",
    "[auth]\nkey_file = \"/no/such/guardntp.keys\"\n",
])
def test_a_refused_reload_applies_nothing_and_is_counted(tmp_path: Path, bad_part: str) -> None:
    service = _service(tmp_path, GOOD)
    try:
        pipeline = service.pipeline
        auto_before = service.blocklist.auto.policy
        # The new burst comes first in the file: nothing of it may become live.
        text = GOOD.replace("source_burst = 2", "source_burst = 100")
        text = text.replace("kod_interval_s = 0", bad_part) \
            if bad_part.startswith("kod") else text + bad_part
        (tmp_path / "guardntp.toml").write_text(text)
        with pytest.raises(ReloadRejected):
            service.reload()
        assert pipeline.compiled.source_limit.burst == 2
        assert pipeline.policy.source_burst == 2
        assert service.config.filter.source_burst == 2
        assert service.blocklist.auto.policy == auto_before
        assert service.operations.reloads == {"ok": 0, "rejected": 1}
        # The control socket's reload is the same path: refused, one line, counted.
        answer = service.commands.reload({"command": "reload"}, 1 << 16)
        assert answer["reloaded"] is False and "\n" not in answer["error"]
        assert service.operations.reloads == {"ok": 0, "rejected": 2}
        assert pipeline.compiled.source_limit.burst == 2
    finally:
        service.blocklist.close()
        for sock in service.sockets:
            sock.close()


def test_a_reload_reads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(tmp_path, GOOD)
    try:
        reads: list[str] = []
        real = service.load_config

        def counting() -> Config:
            reads.append("read")
            return real()

        monkeypatch.setattr(service, "load_config", counting)
        answer = service.commands.reload({"command": "reload"}, 1 << 16)
        assert answer["reloaded"] is True
        assert reads == ["read"]
    finally:
        service.blocklist.close()
        for sock in service.sockets:
            sock.close()


def test_a_refused_sighup_reload_logs_one_line_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "guardntp.toml"
    path.write_text(GOOD)
    with guardntp_server(tmp_path, "-c", str(path)) as server:
        path.write_text(GOOD.replace("source_burst = 2", "source_burst = 100")
                        .replace("kod_interval_s = 0", "kod_interval_s = inf"))
        log = hup_and_wait(server, "reload rejected")
        assert "Traceback" not in log
        assert outcome(server.port) == "time"
