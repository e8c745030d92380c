"""Shared fixtures: a real `guardntp serve` process on a free loopback port, real peers.

Traffic goes only to 127.0.0.1 / ::1 or into private network namespaces the
tests create themselves (``unshare -n``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

needs_chronyd = pytest.mark.skipif(shutil.which("chronyd") is None,
                                   reason="chronyd not installed (Debian package chrony)")
needs_ntpdig = pytest.mark.skipif(shutil.which("ntpdig") is None,
                                  reason="ntpdig not installed (Debian package ntpsec-ntpdate)")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return result.returncode == 0


needs_netns = pytest.mark.skipif(not _can_unshare(),
                                 reason="needs root and `unshare -n` for a private namespace")


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def chronyd_nts_server_config(ntp_port: int, ke_port: int, cert: Path, key: Path) -> str:
    """chrony.conf for chronyd 4.3 serving its local clock with NTS on loopback ports."""
    return (f"port {ntp_port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 10\n"
            f"ntsport {ke_port}\nntsserverkey {key}\nntsservercert {cert}\n"
            f"cmdport 0\nntsprocesses 0\n")


def wait_until_answering(port: int, host: str = "127.0.0.1", timeout_s: float = 30.0) -> None:
    """Poll with guardntp's own client until the server answers (or fail)."""
    from guardntp import client

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.exchange(host, port, timeout_s=0.3)
            return
        except (OSError, client.BogusReply, client.KissOfDeath) as error:
            last = error
            time.sleep(0.05)
    raise RuntimeError(f"server on {host}:{port} never answered: {last}")


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str], port: int, state_dir: Path,
                 log_path: Path) -> None:
        self.process = process
        self.port = port
        self.state_dir = state_dir
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@contextlib.contextmanager
def guardntp_server(tmp_path: Path, *extra_args: str, port: int | None = None,
                    host: str = "127.0.0.1", wait: bool = True,
                    env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Run ``python -m guardntp serve`` on a free port; stop it afterwards."""
    port = port or free_udp_port(host)
    state_dir = tmp_path / f"state-{port}"
    log_path = tmp_path / f"server-{port}.log"
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    args = [sys.executable, "-m", "guardntp", "serve", "--listen", listen,
            "--state-dir", str(state_dir), *extra_args]
    if "--clock" not in extra_args:
        args += ["--clock", "local"]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                   cwd=REPO, env={**os.environ, **(env or {})})
    server = ServerProcess(process, port, state_dir, log_path)
    try:
        if wait:
            try:
                wait_until_answering(port, host)
            except RuntimeError:
                server.stop()
                raise RuntimeError(f"server did not start:\n{server.log()}") from None
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A guardntp server with default settings and the local clock on a free port."""
    with guardntp_server(tmp_path) as running:
        yield running


def chronyd_query(port: int, host: str = "127.0.0.1", timeout_s: int = 10,
                  extra: str = "", conf_dir: Path | None = None,
                  extra_config: str = "") -> subprocess.CompletedProcess[str]:
    """``chronyd -Q``: query once without touching the clock; output has
    "System clock wrong by X seconds (ignored)" when chronyd accepted the server.
    ``extra_config`` adds lines to the conf file (e.g. ``keyfile``; needs ``conf_dir``)."""
    line = f"server {host} port {port} iburst maxsamples 4 {extra}".strip()
    args = ["chronyd", "-Q", "-t", str(timeout_s)]
    if conf_dir is not None:
        # Keep chronyd's pid/socket files out of /run when several run at once.
        args += ["-u", "root", "-f", str(_chrony_conf(conf_dir, f"{line}\n{extra_config}"))]
    else:
        args += [line]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s + 15,
                          check=False)


def _chrony_conf(conf_dir: Path, line: str) -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(conf_dir, 0o700)
    conf = conf_dir / "chrony.conf"
    conf.write_text(f"{line}\npidfile {conf_dir}/chronyd.pid\n"
                    f"bindcmdaddress {conf_dir}/chronyd.sock\ncmdport 0\n")
    return conf


def parse_chronyd_offset(output: str) -> float | None:
    """The X of "System clock wrong by X seconds", or None."""
    for line in output.splitlines():
        if "System clock wrong by" in line:
            return float(line.split("wrong by")[1].split()[0])
    return None


def run_in_netns(script: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a bash script as root inside a fresh private network namespace (lo only)."""
    return subprocess.run(["unshare", "-n", "bash", "-c", "ip link set lo up\n" + script],
                          capture_output=True, text=True, timeout=timeout_s, check=False,
                          cwd=REPO)


class InProcessServer:
    """A real `Server` on a loopback socket, run in a thread, with its pipeline in reach.

    ``events`` records (monotonic ns, packed source, reason) for every packet, so a
    test can see what a real peer sent and what it got, without trusting logs.
    """

    def __init__(self, policy=None, host: str = "127.0.0.1", port: int | None = None) -> None:
        import threading

        from guardntp.filter.pipeline import Pipeline
        from guardntp.filter.policy import FilterPolicy
        from guardntp.netaddr import ListenSpec
        from guardntp.responder import Responder
        from guardntp.server import Server, open_socket
        from guardntp.timesources.local import LocalClock

        self.port = port or free_udp_port(host)
        source = LocalClock()
        now = time.time_ns()
        self.pipeline = Pipeline(policy or FilterPolicy(), Responder(source.state(now), now))
        self.events: list[tuple[int, bytes, object]] = []
        decide = self.pipeline.decide

        def recording_decide(data, packed, port, recv_ns, now_ns, ttl=-1):
            decision = decide(data, packed, port, recv_ns, now_ns, ttl=ttl)
            self.events.append((now_ns, packed, decision[0]))
            return decision

        self.pipeline.decide = recording_decide  # type: ignore[method-assign]
        # The compiled loop decides common packets without calling ``decide``; here
        # every packet must be recorded, so it hands all of them to Python.
        lane_policy = self.pipeline.lane_policy
        self.pipeline.lane_policy = (  # type: ignore[method-assign]
            lambda: lane_policy().disabled())
        self.sock = open_socket(ListenSpec(host, self.port))
        self.server = Server([self.sock], self.pipeline, source)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.thread.join(timeout=5)
        self.sock.close()

    def reasons_from(self, packed: bytes | None = None) -> list[object]:
        return [reason for _, source, reason in self.events if packed is None or source == packed]


@contextlib.contextmanager
def chronyd_running(directory: Path, config: str) -> Iterator[subprocess.Popen[str]]:
    """A real chronyd without clock control (``-x``) running ``config`` (plus its own pid
    and drift files under ``directory``); terminated afterwards."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "chrony.conf"
    conf.write_text(f"{config}\npidfile {directory}/chronyd.pid\ndriftfile {directory}/drift\n")
    process = subprocess.Popen(["chronyd", "-x", "-d", "-u", "root", "-f", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


# Imports everything a command needs while still root, then becomes user nobody for
# good: the check does not depend on nobody being able to read the checkout (a
# fresh clone in a 0700 directory is the usual case in CI).
_AS_NOBODY = """
import os, sys
import encodings.idna, importlib.readers   # lazily loaded by getaddrinfo and resources
import guardntp.cli, guardntp.config, guardntp.setclock
import guardntp.timesources.local, guardntp.timesources.system, guardntp.timesources.upstream
guardntp.cli.build_parser()   # imports every command module
guardntp.config.default_config_text()
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(guardntp.cli.main(sys.argv[1:]))
"""


def run_guardntp_as_nobody(argv: list[str], timeout_s: float = 30
                           ) -> subprocess.CompletedProcess[str]:
    """``guardntp ARGV`` as an unprivileged user (as root: dropping to uid/gid 65534)."""
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, "-m", "guardntp", *argv], capture_output=True,
                              text=True, timeout=timeout_s, check=False, cwd=REPO)
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, *argv], capture_output=True,
                          text=True, timeout=timeout_s, check=False, cwd="/")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user (nobody, or the server after its privilege drop) can
    reach: pytest's tmp_path is root-only."""
    path = Path(tempfile.mkdtemp(prefix="guardntp-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)
