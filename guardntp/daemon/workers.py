"""``--workers N``: N processes answer on the same port, as one server.

Rule: the parent binds every socket (so a port below 1024 needs root once, before
any worker exists, and a port someone already holds is refused before any
worker exists: :func:`~guardntp.daemon.steering.open_worker_sockets`), forks
the workers after the configuration is loaded, and from then on relays
signals, watches its children and speaks for the server to systemd. Everything
that answers packets runs in the workers, each a complete :class:`Service`;
requests are steered by source prefix (``steering.py``).

One server, seen from outside:
- **Figures.** Only worker 0 has the control socket and the metrics endpoint;
  it asks the others for theirs over private links (``peers.py``), so
  ``guardntp stats``, ``clients`` and ``/metrics`` cover every worker.
- **Readiness.** systemd listens to the main PID: the parent sends READY=1
  once every worker has started, RELOADING=1 / READY=1 around a reload and
  STOPPING=1; the workers send nothing.
- **Reload.** SIGHUP to the parent reaches every worker; ``guardntp reload``
  through worker 0 is applied there and passed to the parent, which passes it
  on to the others.
- **Shutdown.** Each worker hands its totals to the parent, which logs one
  line for the server.

If a worker dies the parent stops the others: a half-served prefix space is
worse than a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import time
from dataclasses import replace

from .. import systemd
from ..config import Config
from ..logs import LogSetup
from ..server import ListenError
from .errors import DaemonError
from .peers import PeerLinks
from .service import ConfigLoader, Service, describe_totals
from .steering import open_worker_sockets

log = logging.getLogger("guardntp")

#: Seconds the parent waits for workers after passing on SIGTERM, then SIGKILL.
STOP_TIMEOUT_S = 15.0
#: Seconds a worker may take to start (open its state, measure the clock precision).
STARTUP_TIMEOUT_S = 60.0
_RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Worker:
    """The parent's view of one worker: its pid and the pipe it reports on."""

    def __init__(self, index: int, pid: int, report: int) -> None:
        self.index = index
        self.pid = pid
        self.report = report       # "1" when started, then its totals as JSON at exit
        self.totals: dict[str, int] = {}

    def read_totals(self) -> None:
        """The JSON line the worker wrote before it exited (none if it was killed)."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.report, 65536):
                data += chunk
        os.close(self.report)
        with contextlib.suppress(ValueError):
            # lstrip: the readiness byte is still there if the wait for it timed out.
            totals = json.loads(data.lstrip(b"1") or b"{}")
            if isinstance(totals, dict):
                self.totals = {str(k): int(v) for k, v in totals.items()}


def serve_workers(config: Config, load_config: ConfigLoader, key_file: str | None,
                  log_setup: LogSetup | None) -> int:
    """Bind, fork ``config.server.workers`` workers, relay signals, return the exit code."""
    count = config.server.workers
    if os.environ.get("LISTEN_FDS"):
        raise DaemonError("--workers needs its own listen sockets: with systemd socket "
                          "activation run one worker per socket unit", 2)
    try:
        per_worker = open_worker_sockets(config.server.listen, count, config.filter)
    except ListenError as error:
        raise DaemonError(str(error)) from None
    except OSError as error:
        raise DaemonError(f"cannot steer requests between workers: {error.strerror} "
                          "(SO_ATTACH_REUSEPORT_CBPF needs Linux 4.5)") from None
    # Worker 0's link to each other worker, made before any fork.
    links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count - 1)]
    # Signals wait in the parent's queue from here on (sigtimedwait below tells who
    # sent a SIGHUP); each worker unblocks them first thing.
    signal.pthread_sigmask(signal.SIG_BLOCK, {*_RELAYED, signal.SIGCHLD})
    workers: dict[int, _Worker] = {}
    for index in range(count):
        # One at a time: each worker opens the shared state (the blocklist store) and
        # says so before the next starts, so they never race to create it.
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(report_read)
            os._exit(_worker_main(config, load_config, key_file, log_setup, index,
                                  per_worker, links, report_write))
        os.close(report_write)
        workers[pid] = _Worker(index, pid, report_read)
        if not _wait_ready(report_read, STARTUP_TIMEOUT_S):
            break   # _supervise sees the worker's exit and stops the others
    for sockets in per_worker:
        for sock in sockets:
            sock.close()
    for pair in links:
        for sock in pair:
            sock.close()
    started = len(workers) == count
    if started:
        log.info("guardntp: %d workers (pids %s), requests steered by source prefix",
                 count, " ".join(str(pid) for pid in workers))
        systemd.notify("READY=1")
    try:
        return _supervise(workers)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_RELAYED, signal.SIGCHLD})


def _wait_ready(ready: int, timeout_s: float) -> bool:
    """Did the worker at the other end of the pipe report that it started?"""
    readable, _, _ = select.select([ready], [], [], timeout_s)
    return bool(readable) and os.read(ready, 1) == b"1"


def _worker_main(config: Config, load_config: ConfigLoader, key_file: str | None,
                 log_setup: LogSetup | None, index: int,
                 per_worker: list[list[socket.socket]],
                 links: list[tuple[socket.socket, socket.socket]], report: int) -> int:
    try:
        # SIGHUP's default action ends a process: until the service installs its
        # reload handler, a SIGHUP is ignored (the configuration was just read).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_RELAYED, signal.SIGCHLD})
        for other, sockets in enumerate(per_worker):
            if other != index:
                for sock in sockets:
                    sock.close()
        # Worker 0 keeps the first end of every link, worker i the second end of its own.
        mine = [pair[0] for pair in links] if index == 0 else [links[index - 1][1]]
        for pair in links:
            for sock in pair:
                if sock not in mine:
                    sock.close()
        if index:
            # One control socket and one metrics port: worker 0's.
            extra = {**config.extra, "control": {**config.extra.get("control", {}),
                                                 "enabled": False},
                     "metrics": {**config.extra.get("metrics", {}), "listen": None}}
            config = replace(config, extra=extra)
        parent = os.getppid()
        service = Service(
            config, load_config, key_file=key_file, log_setup=log_setup,
            sockets=per_worker[index], workers=len(per_worker),
            on_control_reload=lambda: os.kill(parent, signal.SIGHUP),
            peers=PeerLinks(mine) if index == 0 else None,
            peer_answerer_socket=mine[0] if index else None,
            notify_systemd=False, serve_nts_ke=index == 0)
        os.write(report, b"1")
        status = service.run()
        os.write(report, json.dumps(service.totals()).encode())
        return status
    except DaemonError as error:
        log.error("worker %d: %s", index, error)
        return error.status
    except KeyboardInterrupt:
        return 0
    except BaseException:
        log.exception("worker %d failed", index)
        return 1


def _supervise(workers: dict[int, _Worker]) -> int:
    """Relay signals to the workers until they have all exited; the first failure's code."""
    exit_code = 0
    stop_deadline: float | None = None
    running = dict(workers)

    def stop_all(signum: int) -> None:
        nonlocal stop_deadline
        if stop_deadline is None:
            stop_deadline = time.monotonic() + STOP_TIMEOUT_S
            systemd.notify("STOPPING=1")
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    while running:
        info = signal.sigtimedwait({*_RELAYED, signal.SIGCHLD}, 1.0)
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                running.clear()
                break
            if pid == 0:
                break
            worker = running.pop(pid)
            worker.read_totals()
            code = os.waitstatus_to_exitcode(status)
            if stop_deadline is None:
                log.error("worker %d (pid %d) exited with %d: stopping the others",
                          worker.index, pid, code)
                exit_code = code or 1
                stop_all(signal.SIGTERM)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s: stopping %d workers", signal.Signals(info.si_signo).name,
                     len(running))
            stop_all(signal.SIGTERM)
        elif info is not None and info.si_signo == signal.SIGHUP and stop_deadline is None:
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            for pid in running:
                if pid != info.si_pid:   # a worker's own reload needs no echo
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
            systemd.notify("READY=1")
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stop_deadline = time.monotonic() + STOP_TIMEOUT_S
    totals: dict[str, int] = {}
    for worker in workers.values():
        for key, value in worker.totals.items():
            totals[key] = totals.get(key, 0) + value
    shares = " / ".join(str(worker.totals.get("packets", 0)) for worker in
                        sorted(workers.values(), key=lambda worker: worker.index))
    log.info("stopped: %s from %d workers (%s)", describe_totals(totals), len(workers), shares)
    return exit_code
