#!/usr/bin/env python3
"""Profile guardntp's packet loop under load: where does each answer's CPU go?

Runs a real :class:`~guardntp.server.Server` (its packet loop, the default filter)
in this process on 127.0.0.1, pinned to one CPU, with its source table already
holding ``--sources`` sources, while ``bench/ntpflood.c`` floods it from the
other CPU. Everything happens inside a private network namespace (the script
re-runs itself under ``unshare -n``). Reports CPU per packet split into user
and kernel time, and optionally:

* ``--cprofile``: the functions' shares (cProfile; inflates per-call costs);
* ``--perf FILE``: a ``perf record`` of the server's CPU during the load, for
  ``perf report -i FILE --no-children --sort dso,sym``;
* ``--null-decide``: replace the filter by a function that answers with a fixed
  reply, to see what the I/O loop alone costs;
* ``--over-limit``: every source's bucket drained beforehand (no leak, no KoD),
  so every request takes the rate-limited drop path: its CPU per packet against
  the answer path's, same harness.

    python3 bench/profile_server.py --sources 1000000 --rate 300000
    python3 bench/profile_server.py --perf /tmp/guardntp.perf
    python3 bench/profile_server.py --null-decide
    python3 bench/profile_server.py --over-limit
    python3 bench/profile_server.py --pure-defaults --perf /tmp/guardntp.perf
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.policy import FilterPolicy  # noqa: E402
from guardntp.netaddr import ListenSpec  # noqa: E402
from guardntp.responder import Responder  # noqa: E402
from guardntp.server import Server, open_socket  # noqa: E402
from guardntp.timesources.local import LocalClock  # noqa: E402
from guardntp.verdicts import Reason  # noqa: E402

NETNS_MARK = "GUARDNTP_PROFILE_NETNS"
PORT = 12399
REQUEST = bytes([0x23, 0, 6, 0xEC]) + bytes(44)


def source_address(index: int) -> bytes:
    """bench/ntpflood.c's layout: 16 sources per /24 across 127/8."""
    return bytes((127, (index & 0xFFFF) >> 8, index & 0xFF, 16 + (index >> 16)))


def thread_times(tid: int) -> tuple[float, float]:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_busy_s(cpu: int) -> float:
    """Seconds CPU ``cpu`` was not idle, from /proc/stat. Unlike a thread's utime and
    stime (charged a whole clock tick at a time, to whatever runs when the tick
    fires), idle time is measured exactly on a tickless kernel, so this stays
    right when the server sleeps between requests."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{cpu}":
            ticks = [int(value) for value in fields[1:8]]
            idle = ticks[3] + ticks[4]   # idle, iowait
            return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=300_000, help="offered requests/s")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--generator-cpu", type=int, default=1)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--perf", metavar="FILE")
    parser.add_argument("--null-decide", action="store_true")
    parser.add_argument("--over-limit", action="store_true")
    parser.add_argument("--pure-defaults", action="store_true",
                        help="the default FilterPolicy and no source seen before: a spoofed "
                             "flood of --sources never-seen addresses")
    args = parser.parse_args(argv)
    if not 1 <= args.sources <= 65536 * 224 or not 0 < args.seconds <= 60:
        parser.error("--sources 1..14680064, --seconds up to 60")
    if os.environ.get(NETNS_MARK) != "1":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            print("profile_server: needs root and unshare", file=sys.stderr)
            return 2
        command = ["unshare", "-n", "--", sys.executable, str(Path(__file__).resolve()),
                   *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(command, env={**os.environ, NETNS_MARK: "1"})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.sched_setaffinity(0, {args.server_cpu})

    with tempfile.TemporaryDirectory(prefix="guardntp-profile-") as temp:
        generator = Path(temp) / "ntpflood"
        subprocess.run(["gcc", "-O2", "-o", str(generator), str(BENCH / "ntpflood.c")],
                       check=True)
        source = LocalClock()
        now = time.time_ns()
        policy = (FilterPolicy() if args.pure_defaults
                  else FilterPolicy(max_sources=max(args.sources, 1 << 18)))
        if args.over_limit:
            policy = dataclasses.replace(policy, leak_one_in=0, send_kod=False)
        pipeline = Pipeline(policy, Responder(source.state(now), now))
        # Every source once, long enough ago that its bucket is full again.
        past = time.monotonic_ns() - 100 * 10**9
        for index in range(0 if args.pure_defaults else args.sources):
            pipeline.decide(REQUEST, source_address(index), 40000, now, past)
        if args.over_limit:   # ... or drained for the next 11 days
            for record in pipeline.sources.records.values():
                record[0] = past + 10**15
        print(f"{len(pipeline.sources)} sources tracked", flush=True)
        if args.null_decide:
            canned = (Reason.ANSWERED, bytes(48), None)
            counts = pipeline.counters.counts

            def null_decide(data: bytes, packed: bytes, port: int, recv_ns: int,
                            now_ns: int, ttl: int = -1) -> tuple[Reason, bytes, None]:
                counts[0] += 1
                return canned

            pipeline.decide = null_decide  # type: ignore[method-assign]
        sock = open_socket(ListenSpec("127.0.0.1", PORT))
        server = Server([sock], pipeline, source)
        server_thread = threading.get_native_id()
        report: dict[str, object] = {}

        def load() -> None:
            time.sleep(0.3)
            before = pipeline.counters.total()
            user0, system0 = thread_times(server_thread)
            busy0 = cpu_busy_s(args.server_cpu)
            perf = None
            if args.perf:
                perf = subprocess.Popen(
                    ["perf", "record", "-e", "cpu-clock", "-g", "-C", str(args.server_cpu),
                     "-o", args.perf, "--", "sleep", str(min(2.0, args.seconds))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            output = subprocess.run(
                ["taskset", "-c", str(args.generator_cpu), str(generator), "127.0.0.1",
                 str(PORT), f"{args.rate:.0f}", str(args.seconds), str(args.sources), "40000"],
                capture_output=True, text=True, check=True, timeout=args.seconds + 30).stdout
            if perf is not None:
                perf.wait(timeout=60)
            user1, system1 = thread_times(server_thread)
            busy1 = cpu_busy_s(args.server_cpu)
            packets = pipeline.counters.total() - before
            report.update(json.loads(output))
            report["packets"] = packets
            report["reasons"] = pipeline.counters.by_reason()
            if packets:
                report["user_us_per_packet"] = round((user1 - user0) * 1e6 / packets, 2)
                report["kernel_us_per_packet"] = round((system1 - system0) * 1e6 / packets, 2)
                report["cpu_busy_us_per_packet"] = round((busy1 - busy0) * 1e6 / packets, 2)
            server.stop()

        threading.Thread(target=load, daemon=True).start()
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.runcall(server.run)
        else:
            server.run()
        sock.close()
        print(json.dumps(report))
        if args.cprofile:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
