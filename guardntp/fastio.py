"""Batched datagram I/O for the server loop: recvmmsg and sendmmsg through ctypes.

Rule: this module moves bytes between one UDP socket and buffers allocated
once; it decides nothing. :meth:`BatchSocket.pump` receives up to a batch of
datagrams with one ``recvmmsg``, reads each one's kernel receive timestamp
(the SO_TIMESTAMPNS control message) and source address straight out of the
buffers the kernel filled, asks ``decide`` about each, then sends the replies
with ``sendmmsg`` in chunks of :data:`STAMP_EVERY`, each chunk's time replies
carrying a transmit timestamp read just before that call (a MAC signer runs
after the stamp, as it must).

Why: on loopback one ``recvmsg`` + ``sendto`` pair per packet costs about
9.6 us of a core with kernel timestamps, against about 4.9 us batched
(``docs/benchmarks.md`` has this machine's figures). The kernel work per
packet is the same; what batching removes is one system call entry and one
Python-level socket call, tuple and ancillary-data list per packet.

Layout, per message i of a batch (all in memory owned here, never resized):

* two iovecs: the first 48 bytes land in ``heads`` (contiguous, so one
  ``bytes`` copy per batch makes every ordinary request a cheap slice), the
  rest of a longer datagram in ``tails``;
* ``names``: the source sockaddr, which is then the reply's destination (the
  send header points at it, no copy);
* ``control``: room for exactly one timestamp control message.

Linux only. :func:`available` says whether this module can serve a socket;
the server keeps its one-``recvmsg``-per-packet loop as the fallback.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from .verdicts import Counters, Reason

log = logging.getLogger("guardntp.server")

#: Messages per recvmmsg call. A request waits for its whole batch to be decided
#: before its reply goes out: 64 keeps that near 0.3 ms at full load (about 5 us of
#: Python each), while the system-call cost per packet is already ~1/64.
BATCH_SIZE = 64
#: Replies per sendmmsg, each chunk with a transmit timestamp read just before it: the
#: last reply leaves ~25 us after its stamp at full load (64 at once: ~100 us).
STAMP_EVERY = 16
#: Larger than any NTP packet we accept (48 + extension fields + MAC); longer is cut.
RECV_BUFFER = 2048
HEAD = 48
#: A time reply's length; its last 8 bytes (the transmit timestamp) are sent from one
#: 8-byte buffer shared by the batch, rewritten just before each sendmmsg.
TIME_REPLY = 48
_BEFORE_TRANSMIT = TIME_REPLY - 8

# <asm-generic/socket.h>: not exported by Python's socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_CONTROL_SPACE = socket.CMSG_SPACE(16)          # one struct timespec
#: The cmsghdr's (level, type) read as one native 64-bit word: one comparison per packet.
_TIMESTAMP_KEY: int = struct.unpack("@q", struct.pack("@ii", socket.SOL_SOCKET,
                                                      SCM_TIMESTAMPNS))[0]

Signer = Callable[[bytes], bytes]
#: A reply finished at flush time: (queue index, reply, signer or None, is a time reply).
_Deferred = tuple[int, bytes, "Signer | None", bool]
Decide = Callable[[bytes, bytes, int, int, int], tuple[Reason, "bytes | None", "Signer | None"]]

# Time replies are exactly the reasons up to LEAKED (``verdicts.Reason`` keeps them first).
_LAST_TIME_REASON = Reason.LEAKED
assert {r for r in Reason if r <= _LAST_TIME_REASON} == {Reason.ANSWERED, Reason.LEAKED}

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
# A plain int: socket's flag enums would run Python code for every ``|``.
_RECV_FLAGS = int(socket.MSG_DONTWAIT) | int(socket.MSG_TRUNC)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_MMSG = ctypes.sizeof(_Mmsghdr)
_IOV = ctypes.sizeof(_Iovec)
# Per-packet reads index memoryviews cast to 32- and 64-bit words; these are the word indices.
_WORDS32 = _MMSG // 4            # 32-bit words per mmsghdr
_WORDS64 = _MMSG // 8            # 64-bit words per mmsghdr
_LEN_WORD = _Mmsghdr.msg_len.offset // 4
_NAME_WORD = _Msghdr.msg_name.offset // 8
_IOVLEN_WORD = _Msghdr.msg_iovlen.offset // 8
_SEND_IOV_WORDS = 2 * _IOV // 8  # two iovecs per reply: the slot, the shared transmit field
_IOV_LEN_WORD = _Iovec.iov_len.offset // 8
assert _MMSG % 8 == 0 and _Mmsghdr.msg_len.offset % 4 == 0


def _load_libc() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_LIBC = _load_libc()


def available(sock: socket.socket | None = None) -> bool:
    """Can :class:`BatchSocket` serve ``sock`` (a UDP socket of IPv4 or IPv6)?"""
    if _LIBC is None or os.environ.get("GUARDNTP_NO_BATCH_IO"):
        return False
    return sock is None or (sock.type == socket.SOCK_DGRAM
                            and sock.family in (socket.AF_INET, socket.AF_INET6))


def _address(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


class BatchSocket:
    """Batched receive-decide-reply for one UDP socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, batch: int = BATCH_SIZE,
                 slot: int = RECV_BUFFER) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        if slot <= HEAD or batch < 1:
            raise ValueError("slot must exceed 48 bytes and batch must be positive")
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.slot = slot
        self.v6 = sock.family == socket.AF_INET6
        self.name_len = 28 if self.v6 else 16   # sockaddr_in6 / sockaddr_in
        self.name_stride = 32 if self.v6 else 16
        self._recvmmsg, self._sendmmsg = _LIBC
        tail = slot - HEAD
        # Buffers the kernel reads and writes: bytearrays pinned by their ctypes views
        # (an exported bytearray cannot be resized, so the addresses stay valid).
        self._heads = bytearray(batch * HEAD)
        self._tails = bytearray(batch * tail)
        self._names = bytearray(batch * self.name_stride)
        self._control = bytearray(batch * _CONTROL_SPACE)
        self._recv_headers = bytearray(batch * _MMSG)
        self._recv_iovecs = bytearray(batch * 2 * _IOV)
        self._out = bytearray(batch * slot)
        self._transmit = bytearray(8)
        self._send_headers = bytearray(batch * _MMSG)
        self._send_iovecs = bytearray(batch * 2 * _IOV)
        addr = {name: _address(getattr(self, name)) for name in (
            "_heads", "_tails", "_names", "_control", "_recv_headers", "_recv_iovecs",
            "_out", "_transmit", "_send_headers", "_send_iovecs")}
        self._names_addr = addr["_names"]
        self._recv_headers_addr = addr["_recv_headers"]
        self._send_headers_addr = addr["_send_headers"]
        recv_iovecs = (_Iovec * (2 * batch)).from_buffer(self._recv_iovecs)
        recv_headers = (_Mmsghdr * batch).from_buffer(self._recv_headers)
        send_iovecs = (_Iovec * (2 * batch)).from_buffer(self._send_iovecs)
        send_headers = (_Mmsghdr * batch).from_buffer(self._send_headers)
        for i in range(batch):
            recv_iovecs[2 * i].iov_base = addr["_heads"] + i * HEAD
            recv_iovecs[2 * i].iov_len = HEAD
            recv_iovecs[2 * i + 1].iov_base = addr["_tails"] + i * tail
            recv_iovecs[2 * i + 1].iov_len = tail
            header = recv_headers[i].msg_hdr
            header.msg_name = self._names_addr + i * self.name_stride
            header.msg_namelen = self.name_len
            header.msg_iov = addr["_recv_iovecs"] + 2 * i * _IOV
            header.msg_iovlen = 2
            header.msg_control = addr["_control"] + i * _CONTROL_SPACE
            header.msg_controllen = _CONTROL_SPACE
            # Reply j: its slot, then (time replies only) the batch's transmit timestamp.
            send_iovecs[2 * i].iov_base = addr["_out"] + i * slot
            send_iovecs[2 * i + 1].iov_base = addr["_transmit"]
            send_iovecs[2 * i + 1].iov_len = 8
            out = send_headers[i].msg_hdr
            out.msg_namelen = self.name_len
            out.msg_iov = addr["_send_iovecs"] + 2 * i * _IOV
            # Set up for a time reply, the common case; others change it and are reset.
            send_iovecs[2 * i].iov_len = _BEFORE_TRANSMIT
            out.msg_iovlen = 2
        del recv_iovecs, recv_headers, send_iovecs, send_headers  # release the exports
        # The kernel rewrites msg_namelen, msg_controllen and msg_flags of every message
        # it fills; a copy of the pristine headers restores them in one memmove per batch.
        self._pristine = memoryview(bytes(self._recv_headers))
        self._zero_control = memoryview(bytes(len(self._control)))
        self._headers_view = memoryview(self._recv_headers)
        self._control_view = memoryview(self._control)
        self._words = memoryview(self._recv_headers).cast("I")
        self._timestamps = memoryview(self._control).cast("q")
        self._heads_view = memoryview(self._heads)
        self._tails_view = memoryview(self._tails)
        self._names_view = memoryview(self._names)
        self._out_view = memoryview(self._out)
        self._send_words = memoryview(self._send_headers).cast("Q")
        self._send_lengths = memoryview(self._send_iovecs).cast("Q")
        # Per message index: where its length, head, source address and timestamp are.
        self._plan = [(i * _WORDS32 + _LEN_WORD, i * HEAD, i * self.name_stride,
                       i * (_CONTROL_SPACE // 8), self._names_addr + i * self.name_stride)
                      for i in range(batch)]
        self._used = batch   # messages whose headers the kernel may have touched

    # ------------------------------------------------------------------ receive

    def _receive(self) -> int:
        """recvmmsg into the buffers: the number of datagrams, 0 when none wait."""
        used = self._used
        self._headers_view[: used * _MMSG] = self._pristine[: used * _MMSG]
        self._control_view[: used * _CONTROL_SPACE] = self._zero_control[
            : used * _CONTROL_SPACE]
        # MSG_TRUNC: msg_len is the datagram's real length, so "longer than a slot"
        # is one comparison.
        count = int(self._recvmmsg(self.fd, self._recv_headers_addr, self.batch,
                                   _RECV_FLAGS, None))
        if count < 0:
            error = ctypes.get_errno()
            self._used = 0
            if error in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            # ICMP errors surface here on some kernels; the next call goes on.
            log.debug("recvmmsg: %s", os.strerror(error))
            return -1
        self._used = count
        return count

    # ------------------------------------------------------------------ the loop

    def pump(self, decide: Decide, counters: Counters, transmit: Callable[[], bytes],
             wall_ns: Callable[[], int], budget: int) -> tuple[int, int, int]:
        """Receive, decide and reply until no datagram waits or ``budget`` were handled.

        ``transmit()`` gives the 8 bytes of the transmit timestamp to serve now; it is
        called once per batch, immediately before the send. ``wall_ns()`` stands in
        for a missing kernel timestamp. Returns (datagrams handled, truncated
        datagrams, failed sends); bytes in and out are added to ``counters``.
        """
        handled = truncated = send_errors = 0
        errors_left = self.batch   # bounded retries after receive errors
        slot = self.slot
        tail = slot - HEAD
        v6 = self.v6
        words = self._words
        stamps = self._timestamps
        heads_view = self._heads_view
        tails_view = self._tails_view
        names_view = self._names_view
        stride = self.name_stride
        out_view = self._out_view
        send_words = self._send_words
        send_lengths = self._send_lengths
        plan = self._plan
        monotonic_ns = time.monotonic_ns
        while handled < budget:
            count = self._receive()
            if count <= 0:
                if count < 0 and errors_left > 0:
                    errors_left -= 1
                    continue
                break
            now_ns = monotonic_ns()
            heads = bytes(heads_view[: count * HEAD])
            names = bytes(names_view[: count * stride])
            bytes_in = bytes_out = queued = 0
            time_replies = False
            deferred: list[_Deferred] | None = None
            other: list[int] | None = None   # slots laid out for a non-time reply
            for length_at, h, a, c, name_address in plan[:count]:
                length = words[length_at]
                if length == HEAD:
                    data = heads[h:h + HEAD]
                elif length < HEAD:
                    data = heads[h:h + length]
                elif length <= slot:
                    t = (h // HEAD) * tail
                    data = heads[h:h + HEAD] + bytes(tails_view[t:t + length - HEAD])
                else:
                    truncated += 1
                    length = slot
                    data = b""   # counted as malformed by the sanity stage
                bytes_in += length
                if v6:
                    packed = names[a + 8:a + 24]
                    if packed[:12] == _V4_MAPPED:
                        packed = packed[12:]
                else:
                    packed = names[a + 4:a + 8]
                recv_ns = (stamps[c + 2] * 1_000_000_000 + stamps[c + 3]
                           if stamps[c + 1] == _TIMESTAMP_KEY else wall_ns())
                reason, reply, signer = decide(data, packed, (names[a + 2] << 8) | names[a + 3],
                                               recv_ns, now_ns)
                if reply is None:
                    continue
                o = queued * slot
                send_words[queued * _WORDS64 + _NAME_WORD] = name_address
                is_time = reason <= _LAST_TIME_REASON
                if is_time and signer is None and len(reply) == TIME_REPLY:
                    # 40 bytes from the slot, the transmit timestamp from the batch's
                    # shared 8 bytes (the preset layout): stamped once, just before the send.
                    out_view[o:o + TIME_REPLY] = reply
                    time_replies = True
                    bytes_out += TIME_REPLY
                else:
                    size = len(reply)
                    if size > slot:   # cannot happen: a reply is never longer than its request
                        send_errors += 1
                        log.error("reply of %d bytes does not fit a %d-byte slot", size, slot)
                        continue
                    out_view[o:o + size] = reply
                    send_lengths[queued * _SEND_IOV_WORDS + _IOV_LEN_WORD] = size
                    send_words[queued * _WORDS64 + _IOVLEN_WORD] = 1
                    if other is None:
                        other = []
                    other.append(queued)
                    bytes_out += size
                    if signer is not None or is_time:   # stamped (then signed) at flush
                        if deferred is None:
                            deferred = []
                        deferred.append((queued, reply, signer, is_time))
                queued += 1
            handled += count
            counters.bytes_in += bytes_in
            if queued:
                sent_bytes, failed = self._flush(queued, time_replies, deferred, transmit,
                                                 bytes_out)
                counters.bytes_out += sent_bytes
                send_errors += failed
            if other is not None:
                for index in other:   # back to the time-reply layout
                    send_lengths[index * _SEND_IOV_WORDS + _IOV_LEN_WORD] = _BEFORE_TRANSMIT
                    send_words[index * _WORDS64 + _IOVLEN_WORD] = 2
            if count < self.batch:
                break   # the queue is (very probably) empty: saves the EAGAIN call
        return handled, truncated, send_errors

    # ------------------------------------------------------------------ send

    def _message_bytes(self, index: int) -> int:
        lengths = self._send_lengths
        iovecs = self._send_words[index * _WORDS64 + _IOVLEN_WORD]
        return int(lengths[index * _SEND_IOV_WORDS + _IOV_LEN_WORD]) + (8 if iovecs == 2 else 0)

    def _flush(self, queued: int, time_replies: bool, deferred: list[_Deferred] | None,
               transmit: Callable[[], bytes], bytes_out: int) -> tuple[int, int]:
        """Stamp, sign and sendmmsg the queued replies: (bytes sent, failed sends)."""
        skip: set[int] = set()
        if time_replies or deferred:
            xmt = transmit()
            self._transmit[:] = xmt
        if deferred is not None:
            slot = self.slot
            for index, reply, signer, is_time in deferred:
                if is_time:
                    reply = reply[:40] + xmt + reply[48:]
                final = signer(reply) if signer is not None else reply
                old = self._message_bytes(index)
                if len(final) > slot:
                    log.error("reply of %d bytes does not fit a %d-byte slot",
                              len(final), slot)
                    skip.add(index)
                    bytes_out -= old
                    continue
                o = index * slot
                self._out_view[o:o + len(final)] = final
                self._send_lengths[index * _SEND_IOV_WORDS + _IOV_LEN_WORD] = len(final)
                bytes_out += len(final) - old
        failed = len(skip)
        start = 0
        retries = 3
        stamped_through = STAMP_EVERY   # the first chunk carries the stamp taken above
        while start < queued:
            if start in skip:
                start += 1
                continue
            end = queued
            if skip:
                end = min([index for index in skip if index > start], default=queued)
            if start >= stamped_through:
                # A fresh stamp every STAMP_EVERY replies: the kernel sends them one after
                # another, and a stamp read long before a packet leaves shifts the client's
                # offset by half the wait.
                if time_replies:
                    self._transmit[:] = transmit()
                stamped_through = start + STAMP_EVERY
            end = min(end, stamped_through)
            sent = int(self._sendmmsg(self.fd, self._send_headers_addr + start * _MMSG,
                                      end - start, 0))
            if sent > 0:
                start += sent
                continue
            error = ctypes.get_errno() if sent < 0 else errno.EIO
            if error == errno.EINTR and retries > 0:
                retries -= 1
                continue
            # The message at ``start`` failed: count it, skip it, send the rest.
            failed += 1
            bytes_out -= self._message_bytes(start)
            log.debug("sendmmsg: %s", os.strerror(error))
            start += 1
        return bytes_out, failed
