#!/usr/bin/env python3
"""Sizing figures for docs/operations.md, measured through the real ``Pipeline``.

    python3 contrib/sizing/measure.py                 # 100k sources, both layouts
    python3 contrib/sizing/measure.py --sources 20000 --json

Memory: ``tracemalloc`` counts every Python allocation that is still alive
after N distinct sources have each sent one NTPv4 request (the records, the
table entries, the keys, the prefix buckets). Two layouts: sources packed 256
to an IPv4 /24 (a few prefix entries), and every source in its own /24 (one
prefix entry each: the worst case, what a spoofed flood produces).

Speed: ``Pipeline.decide`` calls per second on one core, without sockets, for
three traffic mixes. The socket loop (recvmsg/sendto) costs more than the
decision; see docs/operations.md for what that means per core.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.policy import FilterPolicy  # noqa: E402
from guardntp.responder import Responder  # noqa: E402
from guardntp.timesources.local import LocalClock  # noqa: E402

REQUEST = bytes([0x23]) + bytes(47)  # NTPv4 client
NOW = 1_700_000_000 * 10**9


def make_pipeline(sources: int, **policy: object) -> Pipeline:
    base = replace(FilterPolicy(), max_sources=max(sources, 1), max_prefixes=max(sources, 1))
    clock = LocalClock().state(NOW)
    return Pipeline(replace(base, **policy), Responder(clock, NOW))  # type: ignore[arg-type]


def address(index: int, own_prefix: bool) -> bytes:
    # own_prefix: 1.0.0.1, 1.0.1.1, ... (one /24 each); else 1.0.0.0, 1.0.0.1, ...
    number = 0x01000000 + (index << 8 | 1 if own_prefix else index)
    return number.to_bytes(4, "big")


def memory_per_source(sources: int, own_prefix: bool) -> dict[str, float]:
    addresses = [address(i, own_prefix) for i in range(sources)]
    pipeline = make_pipeline(sources)
    decide = pipeline.decide
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, packed in enumerate(addresses):
        decide(REQUEST, packed, 40000 + i % 20000, NOW, NOW + i)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(pipeline.sources) == sources, "every source must be tracked"
    return {"sources": sources, "prefixes": len(pipeline.prefixes),
            "bytes_total": after - before, "bytes_per_source": (after - before) / sources}


def decisions_per_second(count: int) -> dict[str, float]:
    results = {}
    mixes = {
        # steady state: 10k known clients, each within its limit
        "known sources, answered": (make_pipeline(10_000, source_rate=1e6, source_burst=10**6),
                                    [address(i % 10_000, False) for i in range(count)]),
        # spoofed flood: every packet from a new address (table insert / eviction)
        "new source every packet": (make_pipeline(65_536),
                                    [address(i, True) for i in range(count)]),
        # one source far over its limit: RATE KoD guard / drops
        "one source over its limit": (make_pipeline(16, leak_one_in=0),
                                      [address(1, False)] * count),
    }
    for name, (pipeline, addresses) in mixes.items():
        decide = pipeline.decide
        start = time.perf_counter()
        for i, packed in enumerate(addresses):
            decide(REQUEST, packed, 40000, NOW, NOW + i * 1000)
        elapsed = time.perf_counter() - start
        results[name] = count / elapsed
    return results


def socket_loop_cost(packets: int) -> dict[str, float]:
    """Server CPU seconds per answered request through the real socket loop (loopback).

    The server runs as its own process with limits out of the way, one client sends
    ``packets`` requests in windows of 32 and reads the replies; the server's
    utime+stime from /proc divided by the replies is the cost of one request, so
    1 / cost is what one core can answer (the client's own speed does not matter).
    """
    import os
    import signal
    import socket
    import subprocess
    import tempfile

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tempfile.mkdtemp(prefix="guardntp-measure-")
    server = subprocess.Popen(
        [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", state, "--log-level", "warning",
         "--set", "filter.source_rate=1e9", "--set", "filter.source_burst=1000000",
         "--set", "filter.prefix_rate=1e9", "--set", "filter.prefix_burst=1000000",
         "--set", "filter.global_reply_rate=0"],
        cwd=Path(__file__).resolve().parents[2], stderr=subprocess.DEVNULL)
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    replies = 0
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            for _ in range(100):  # wait (at most 20 s) for the server to answer
                sock.sendto(REQUEST, ("127.0.0.1", port))
                try:
                    sock.recv(128)
                    break
                except TimeoutError:
                    continue
            else:
                raise RuntimeError("server did not start")
            start_cpu, start = cpu_seconds(), time.perf_counter()
            window = 32
            # /proc counts CPU in clock ticks (10 ms): keep going past ``packets`` until
            # the server has used at least 20 ticks, so the quotient means something
            # (bounded: at most 100 x ``packets`` and 30 s).
            sent = 0
            while sent < packets or (cpu_seconds() - start_cpu < 20 / ticks
                                     and sent < 100 * packets
                                     and time.perf_counter() - start < 30):
                sent += window
                for _ in range(window):
                    sock.sendto(REQUEST, ("127.0.0.1", port))
                for _ in range(window):
                    try:
                        sock.recv(128)
                        replies += 1
                    except TimeoutError:
                        break
            time.sleep(0.3)  # let the server finish what it had queued
            cpu = cpu_seconds() - start_cpu  # the idle loop's share is negligible
            wall = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        subprocess.run(["rm", "-rf", state], check=False)
    if replies == 0 or cpu <= 0:
        raise RuntimeError(f"could not measure: {replies} replies for {cpu:.2f} s of server CPU")
    return {"replies": replies, "server_cpu_s": cpu, "wall_s": wall,
            "us_per_request": cpu / replies * 1e6, "requests_per_core_second": replies / cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=100_000)
    parser.add_argument("--packets", type=int, default=200_000,
                        help="decisions per traffic mix for the speed figures")
    parser.add_argument("--socket-loop", action="store_true",
                        help="also measure the real server's CPU per request over loopback")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = {
        "python": sys.version.split()[0],
        "memory_shared_prefixes": memory_per_source(args.sources, own_prefix=False),
        "memory_own_prefix": memory_per_source(args.sources, own_prefix=True),
        "decisions_per_second": decisions_per_second(args.packets),
    }
    if args.socket_loop:
        try:
            report["socket_loop"] = socket_loop_cost(args.packets)
        except (RuntimeError, OSError) as error:
            print(f"measure.py: socket loop: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Python {report['python']}")
    for key, label in (("memory_shared_prefixes", "256 sources per /24"),
                       ("memory_own_prefix", "one /24 per source (worst case)")):
        m = report[key]
        assert isinstance(m, dict)
        print(f"{label}: {m['sources']:,} sources, {m['prefixes']:,} prefixes, "
              f"{m['bytes_total'] / 2**20:.1f} MiB, {m['bytes_per_source']:.0f} B per source")
    speeds = report["decisions_per_second"]
    assert isinstance(speeds, dict)
    for name, rate in speeds.items():
        print(f"Pipeline.decide, {name}: {rate:,.0f} per second (one core, no sockets)")
    loop = report.get("socket_loop")
    if isinstance(loop, dict):
        print(f"socket loop: {loop['replies']:,} replies, server CPU {loop['server_cpu_s']:.2f} s"
              f" = {loop['us_per_request']:.1f} us per request, "
              f"{loop['requests_per_core_second']:,.0f} requests per core-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
