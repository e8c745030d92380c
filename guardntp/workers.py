"""``--workers N``: N processes answer on the same port, each source's state in one of them.

Rule: the parent binds every socket (so a port below 1024 needs root once, before
any worker exists), forks the workers after the configuration is loaded, and
from then on only relays signals and watches its children. Everything that
answers packets runs in the workers, each a complete :class:`Service`.

Steering. Each listen address gets one SO_REUSEPORT socket per worker, and the
group gets a classic BPF program (SO_ATTACH_REUSEPORT_CBPF) that picks the
worker from the request's *source prefix* (IPv4 /24, IPv6 /56 by default: the
filter's ``ipv4_prefix`` / ``ipv6_prefix``). A prefix contains its sources,
so a source's bucket and its prefix's bucket both live in exactly one worker
and every per-source and per-prefix limit means what it says. The kernel's
default reuseport hash (over address *and port*) would split one client's
requests across workers, handing it N buckets.

What is per worker, and so divided by N: the server-wide budgets
(``global_reply_rate`` and ``kod_rate`` with their bursts), so their total
stays as configured. What only worker 0 has: the control socket and the
metrics endpoint (their figures are worker 0's share; ``guardntp reload``
through the control socket is passed on to every worker). SIGHUP and SIGTERM
sent to the parent reach every worker. If a worker dies the parent stops the
others: a half-served prefix space is worse than a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from .filter.policy import FilterPolicy
from .netaddr import ListenSpec

if TYPE_CHECKING:
    from .commands.serve import Service
    from .config import Config
    from .logs import LogSetup

log = logging.getLogger("guardntp")

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
#: Classic BPF reaches the network header at this negative offset (linux/filter.h).
SKF_NET_OFF = -0x100000
#: Seconds the parent waits for workers after passing on SIGTERM, then SIGKILL.
STOP_TIMEOUT_S = 15.0
#: Seconds a worker may take to start (open its state, measure the clock precision).
STARTUP_TIMEOUT_S = 60.0
_RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Classic BPF opcodes (linux/bpf_common.h).
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_ALU_RSH_K, _ALU_AND_K, _ALU_XOR_X, _ALU_MUL_K, _ALU_MOD_K = 0x74, 0x54, 0xAC, 0x24, 0x94
_JMP_JA, _JMP_JEQ_K = 0x05, 0x15
_RET_A, _MISC_TAX = 0x16, 0x07

Instruction = tuple[int, int, int, int]   # code, jump if true, jump if false, k
#: Fibonacci hashing (Knuth): multiply by 2^32/phi, keep the well-mixed high bits, so
#: that prefixes differing in any bits (127.1.1/24 vs 127.2.2/24) spread evenly.
_GOLDEN = 0x9E3779B1


def split_budgets(policy: FilterPolicy, workers: int) -> FilterPolicy:
    """Each worker's share of the server-wide reply and KoD budgets."""
    if workers <= 1:
        return policy
    return replace(
        policy,
        global_reply_rate=policy.global_reply_rate / workers,
        global_reply_burst=max(1, policy.global_reply_burst // workers),
        kod_rate=policy.kod_rate / workers,
        kod_burst=max(1, policy.kod_burst // workers))


# ----------------------------------------------------------------------------- steering

def _prefix_word(bits: int) -> list[Instruction]:
    """A = the top ``bits`` of the 32-bit word in A (bits 0 -> A = 0)."""
    if bits >= 32:
        return []
    if bits <= 0:
        return [(_ALU_AND_K, 0, 0, 0)]
    return [(_ALU_RSH_K, 0, 0, 32 - bits)]


def steering_program(ipv4_prefix: int, ipv6_prefix: int, workers: int) -> list[Instruction]:
    """Classic BPF: the worker index for a packet, from its source prefix.

    IPv4: the top ``ipv4_prefix`` bits of the source address. IPv6: the top
    ``ipv6_prefix`` bits (at most 64) folded into one word. Then a multiplicative
    hash (32-bit, as classic BPF computes), its high half, and ``mod workers``.
    :func:`worker_for` computes the same in Python.
    """
    v4 = [(_LD_W_ABS, 0, 0, SKF_NET_OFF + 12), *_prefix_word(ipv4_prefix)]
    high, low = min(ipv6_prefix, 32), min(max(ipv6_prefix - 32, 0), 32)
    v6 = [(_LD_W_ABS, 0, 0, SKF_NET_OFF + 8), *_prefix_word(high)]
    if low:
        v6 += [(_MISC_TAX, 0, 0, 0), (_LD_W_ABS, 0, 0, SKF_NET_OFF + 12), *_prefix_word(low),
               (_ALU_XOR_X, 0, 0, 0)]
    mix = [(_ALU_MUL_K, 0, 0, _GOLDEN), (_ALU_RSH_K, 0, 0, 16),
           (_ALU_MOD_K, 0, 0, workers), (_RET_A, 0, 0, 0)]
    head = [(_LD_B_ABS, 0, 0, SKF_NET_OFF + 0), (_ALU_RSH_K, 0, 0, 4),
            # IP version 4? fall through to the IPv4 part, else jump over it and its ja.
            (_JMP_JEQ_K, 0, len(v4) + 1, 4)]
    return [*head, *v4, (_JMP_JA, 0, 0, len(v6)), *v6, *mix]


def _fold(word: int, bits: int) -> int:
    return word if bits >= 32 else 0 if bits <= 0 else word >> (32 - bits)


def worker_for(packed: bytes, ipv4_prefix: int, ipv6_prefix: int, workers: int) -> int:
    """The worker :func:`steering_program` picks for a source (tests and diagnostics)."""
    if len(packed) == 4:
        value = _fold(int.from_bytes(packed, "big"), ipv4_prefix)
    else:
        high, low = min(ipv6_prefix, 32), min(max(ipv6_prefix - 32, 0), 32)
        value = _fold(int.from_bytes(packed[0:4], "big"), high)
        if low:
            value ^= _fold(int.from_bytes(packed[4:8], "big"), low)
    return (((value * _GOLDEN) & 0xFFFF_FFFF) >> 16) % workers


def attach_steering(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach ``program`` to ``sock``'s reuseport group (struct sock_fprog)."""
    code = b"".join(struct.pack("@HBBi" if k < 0 else "@HBBI", op, jt, jf, k)
                    for op, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def open_worker_sockets(specs: tuple[ListenSpec, ...], workers: int, policy: FilterPolicy
                        ) -> list[list[socket.socket]]:
    """``result[w]``: worker w's socket for each listen address, in order.

    Sockets of one address are bound in worker order, which is the index the
    steering program returns. Raises :class:`~guardntp.server.ListenError`.
    """
    from .server import open_socket

    program = steering_program(policy.ipv4_prefix, policy.ipv6_prefix, workers)
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for spec in specs:
            group = [open_socket(spec, reuse_port=True) for _ in range(workers)]
            for worker, sock in enumerate(group):
                per_worker[worker].append(sock)
            attach_steering(group[0], program)
    except BaseException:
        for sockets in per_worker:
            for sock in sockets:
                sock.close()
        raise
    return per_worker


# ----------------------------------------------------------------------------- processes

def serve_workers(args: argparse.Namespace, config: Config, log_setup: LogSetup | None) -> int:
    """Bind, fork ``config.server.workers`` workers, relay signals, return the exit code."""
    from .cli import CommandError
    from .server import ListenError

    workers = config.server.workers
    if os.environ.get("LISTEN_FDS"):
        raise CommandError("--workers needs its own listen sockets: with systemd socket "
                           "activation run one worker per socket unit", 2)
    try:
        per_worker = open_worker_sockets(config.server.listen, workers, config.filter)
    except ListenError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"cannot steer requests between workers: {error.strerror} "
                           "(SO_ATTACH_REUSEPORT_CBPF needs Linux 4.5)") from None
    # Signals wait in the parent's queue from here on (sigtimedwait below tells who
    # sent a SIGHUP); each worker unblocks them first thing.
    signal.pthread_sigmask(signal.SIG_BLOCK, {*_RELAYED, signal.SIGCHLD})
    children: dict[int, int] = {}
    for index in range(workers):
        # One at a time: each worker opens the shared state (the blocklist store) and
        # says so before the next starts, so they never race to create it.
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            os._exit(_worker_main(args, config, log_setup, index, per_worker, ready_write))
        os.close(ready_write)
        children[pid] = index
        started = _wait_ready(ready_read, STARTUP_TIMEOUT_S)
        os.close(ready_read)
        if not started:
            break   # _supervise sees the worker's exit and stops the others
    for sockets in per_worker:
        for sock in sockets:
            sock.close()
    log.info("guardntp: %d workers (pids %s), requests steered by source prefix",
             workers, " ".join(str(pid) for pid in children))
    try:
        return _supervise(children)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_RELAYED, signal.SIGCHLD})


def _wait_ready(ready: int, timeout_s: float) -> bool:
    """Did the worker at the other end of the pipe report that it started?"""
    readable, _, _ = select.select([ready], [], [], timeout_s)
    return bool(readable) and os.read(ready, 1) == b"1"


def _worker_main(args: argparse.Namespace, config: Config, log_setup: LogSetup | None,
                 index: int, per_worker: list[list[socket.socket]], ready: int) -> int:
    from .cli import CommandError
    from .commands.serve import Service

    try:
        # SIGHUP's default action ends a process: until the service installs its
        # reload handler, a SIGHUP is ignored (the configuration was just read).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_RELAYED, signal.SIGCHLD})
        for other, sockets in enumerate(per_worker):
            if other != index:
                for sock in sockets:
                    sock.close()
        if index:
            # One control socket and one metrics port: worker 0's.
            extra = {**config.extra, "control": {**config.extra.get("control", {}),
                                                 "enabled": False},
                     "metrics": {**config.extra.get("metrics", {}), "listen": None}}
            config = replace(config, extra=extra)
        service = Service(args, config, log_setup, sockets=per_worker[index],
                          workers=len(per_worker))
        os.write(ready, b"1")
        os.close(ready)
        if index == 0:
            _relay_control_reloads(service)
        return service.run()
    except CommandError as error:
        log.error("worker %d: %s", index, error)
        return error.status
    except KeyboardInterrupt:
        return 0
    except BaseException:
        log.exception("worker %d failed", index)
        return 1


def _relay_control_reloads(service: Service) -> None:
    """A reload through worker 0's control socket: tell the parent, which tells the rest.

    A reload that came from SIGHUP is not relayed (the parent already sent SIGHUP
    to every worker).
    """
    reload_here = service.reload
    reload_from_signal = service.operations.reload_from_signal
    signalled = False

    def from_signal(running: Service) -> None:
        nonlocal signalled
        signalled = True
        try:
            reload_from_signal(running)
        finally:
            signalled = False

    def reload() -> str:
        message = reload_here()
        if not signalled:
            os.kill(os.getppid(), signal.SIGHUP)
        return message

    service.reload = reload  # type: ignore[method-assign]
    service.operations.reload_from_signal = from_signal  # type: ignore[method-assign,assignment]


def _supervise(children: dict[int, int]) -> int:
    """Relay signals to the workers until they have all exited; the first failure's code."""
    exit_code = 0
    stop_deadline: float | None = None

    def stop_all(signum: int) -> None:
        nonlocal stop_deadline
        if stop_deadline is None:
            stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    while children:
        info = signal.sigtimedwait({*_RELAYED, signal.SIGCHLD}, 1.0)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stop_deadline is None:
                log.error("worker %d (pid %d) exited with %d: stopping the others",
                          index, pid, code)
                exit_code = code or 1
                stop_all(signal.SIGTERM)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s: stopping %d workers", signal.Signals(info.si_signo).name,
                     len(children))
            stop_all(signal.SIGTERM)
        elif info is not None and info.si_signo == signal.SIGHUP:
            for pid in children:
                if pid != info.si_pid:   # a worker's own reload needs no echo
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stop_deadline = time.monotonic() + STOP_TIMEOUT_S
    return exit_code
