"""Steering requests between ``--workers``: one SO_REUSEPORT group, a BPF program.

Rule: each listen address gets one SO_REUSEPORT socket per worker, and the
group gets a classic BPF program (SO_ATTACH_REUSEPORT_CBPF) that picks the
worker from the request's *source prefix* (IPv4 /24, IPv6 /56 by default: the
filter's ``ipv4_prefix`` / ``ipv6_prefix``). A prefix contains its sources,
so a source's bucket and its prefix's bucket both live in exactly one worker
and every per-source and per-prefix limit means what it says. The kernel's
default reuseport hash (over address *and port*) would split one client's
requests across workers, handing it N buckets.

A reuseport group admits any later socket of the same user: a second server
started on the same port would silently join it and take a share of the
traffic. :func:`open_worker_sockets` first binds each address *without*
SO_REUSEPORT, which fails while anyone holds the port, so a second instance is
refused as it is without workers.

What is per worker, and so divided by N: the server-wide budgets
(``global_reply_rate`` and ``kod_rate`` with their bursts), so their total
stays as configured (:func:`split_budgets`).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import replace

from ..filter.policy import FilterPolicy
from ..netaddr import ListenSpec
from ..server import open_socket

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
#: Classic BPF reaches the network header at this negative offset (linux/filter.h).
SKF_NET_OFF = -0x100000

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
    program = steering_program(policy.ipv4_prefix, policy.ipv6_prefix, workers)
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for spec in specs:
            refuse_if_taken(spec)
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


def refuse_if_taken(spec: ListenSpec) -> None:
    """Raise :class:`ListenError` if anyone holds ``spec``, a reuseport group included.

    A plain bind conflicts with every socket on the port, shared or not; the probe
    is closed at once, before this server's own group is bound.
    """
    open_socket(spec).close()
