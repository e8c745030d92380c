#!/usr/bin/env python3
"""chronyd and ``guardntp serve`` side by side on one loopback harness.

Each server in turn (chronyd, guardntp, chronyd, guardntp, ...: A B A B) runs
pinned to one core while ``bench/ntpflood.c`` (compiled here with gcc) floods
it from the other core with NTPv4 client requests from ``--sources`` distinct
spoofed loopback addresses 127.x.y.z. Everything happens inside a private
network namespace (``unshare -n``), so 127.0.0.0/8 is ours and no packet can
leave it. Answers are counted by nftables counters in that namespace (requests
in to the server port, replies out of it), never by asking the server, and
cross-checked by the generator, which also measures latency from the replies.

Per run it reports: the highest offered rate with under 1 % loss (a bounded
search), the answered rate at twice that load, the server's CPU time per
answer (utime + stime from /proc/PID/stat, and the server CPUs' busy time from
/proc/stat, which stays exact when the server sleeps between requests: see
``busy_seconds``), and the latency a reply shows
(transmit minus receive timestamp) at both loads. The summary gives medians
over the rounds and the guardntp / chronyd ratios, per round and median.

Run as root (needs ``unshare -n``, ``nft``, ``gcc``, ``taskset``, ``chronyd``):

    python3 bench/side_by_side.py                    # 3 rounds, about 6 minutes
    python3 bench/side_by_side.py --rounds 1 --quick # a smoke run, about 30 s

The servers run with their defaults: chronyd 4.3 with ``allow``, ``port P``,
``local stratum 10`` (no ``ratelimit``); guardntp with its embedded default
configuration (filter on) except ``filter.max_sources``, raised to hold every
source (see ``--pure-defaults`` and docs/benchmarks.md for why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NETNS_MARK = "GUARDNTP_BENCH_NETNS"
GENERATOR_SOURCE = Path(__file__).resolve().parent / "ntpflood.c"
GENERATOR_PORT = 40000
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOSS_LIMIT = 0.01


# --------------------------------------------------------------------------- the harness

def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)


def build_generator(directory: Path) -> Path:
    binary = directory / "ntpflood"
    run(["gcc", "-O2", "-Wall", "-o", str(binary), str(GENERATOR_SOURCE)])
    return binary


class Counters:
    """nftables counters in this namespace: requests in to ``port``, replies out of it."""

    def __init__(self, port: int) -> None:
        ruleset = f"""
table inet guardntp_bench {{
    counter offered {{ }}
    counter answered {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {port} counter name "offered"
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        udp sport {port} counter name "answered"
    }}
}}
"""
        subprocess.run(["nft", "delete", "table", "inet", "guardntp_bench"],
                       capture_output=True, check=False)
        run(["nft", "-f", "-"], input=ruleset)

    @staticmethod
    def read() -> tuple[int, int]:
        listing = json.loads(run(["nft", "-j", "list", "counters", "table", "inet",
                                  "guardntp_bench"]).stdout)
        values = {item["counter"]["name"]: item["counter"]["packets"]
                  for item in listing["nftables"] if "counter" in item}
        return int(values["offered"]), int(values["answered"])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (guardntp's workers are child processes)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    queue.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return pids


def cpu_list(spec: str) -> list[int]:
    """taskset's CPU list ("0", "0,1", "0-3") as numbers."""
    cpus: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def busy_seconds(cpus: list[int]) -> float:
    """Seconds the given CPUs were not idle, from /proc/stat.

    Why besides utime + stime: a process is charged a whole clock tick at a time,
    to whoever runs when the tick fires, and a tickless kernel stops the tick on an
    idle CPU, so a server that sleeps between requests is overcharged (by 1.5-2 x
    at 100k/s here). Idle time is measured exactly, so busy time on the server's
    own CPUs is the better figure below saturation (anything else scheduled there
    counts too; the script keeps itself on the generator's CPU)."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] in wanted:
            ticks = [int(value) for value in fields[1:8]]
            busy += sum(ticks) - ticks[3] - ticks[4]   # less idle and iowait
    return busy / CLK_TCK


def cpu_ticks(pid: int) -> tuple[int, int, int]:
    """(utime, stime in clock ticks, run-queue wait in ns) over ``pid``'s process tree."""
    user = system = waited = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            with open(f"/proc/{member}/schedstat") as schedstat:
                waited += int(schedstat.read().split()[1])
        except OSError:
            continue
        user += int(fields[11])     # utime (field 14)
        system += int(fields[12])   # stime (field 15)
    return user, system, waited


# --------------------------------------------------------------------------- servers

@dataclass
class ServerRun:
    name: str
    process: subprocess.Popen[str]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_chronyd(work: Path, port: int, cpu: str) -> ServerRun:
    directory = work / "chronyd"
    directory.mkdir(mode=0o700, exist_ok=True)
    # The same binary under another name: `pkill -x chronyd` (tools/bootstrap.sh, run
    # by whoever sets up a machine) must not end a measurement half way.
    binary = directory / "chronyd-bench"
    if not binary.exists():
        shutil.copy2(str(shutil.which("chronyd")), binary)
    conf = directory / "chrony.conf"
    conf.write_text(f"allow\nport {port}\nlocal stratum 10\n"
                    f"pidfile {directory}/chronyd.pid\n"
                    f"bindcmdaddress {directory}/chronyd.sock\ncmdport 0\n")
    log_path = directory / "chronyd.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(["taskset", "-c", str(cpu), str(binary), "-x", "-d", "-u",
                                    "root", "-f", str(conf)], stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
    return ServerRun("chronyd", process, log_path)


def start_guardntp(work: Path, port: int, cpu: str, overrides: list[str],
                   workers: int) -> ServerRun:
    directory = work / "guardntp"
    directory.mkdir(mode=0o700, exist_ok=True)
    log_path = directory / "guardntp.log"
    command = ["taskset", "-c", str(cpu), sys.executable, "-m", "guardntp", "serve",
               "--listen", f"127.0.0.1:{port}", "--state-dir", str(directory / "state")]
    for assignment in overrides:
        command += ["--set", assignment]
    if workers > 1:
        command += ["--workers", str(workers)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   cwd=REPO)
    return ServerRun("guardntp", process, log_path)


def wait_until_answering(server: ServerRun, port: int, timeout_s: float = 30.0) -> None:
    sys.path.insert(0, str(REPO))
    from guardntp import client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text()[-2000:]}")
        try:
            client.exchange("127.0.0.1", port, timeout_s=0.3)
            return
        except Exception:   # not up yet: any failure means "ask again"
            time.sleep(0.1)
    raise RuntimeError(f"{server.name} never answered on port {port}")


# --------------------------------------------------------------------------- one load step

@dataclass
class Step:
    rate: float
    seconds: float
    sent: int
    offered: int
    answered: int
    received: int
    kods: int
    user_s: float
    system_s: float
    cpu_wait_s: float
    busy_s: float
    server_latency_us: dict[str, float]
    rtt_us: dict[str, float]

    @property
    def loss(self) -> float:
        return 1.0 - self.answered / self.offered if self.offered else 1.0

    @property
    def answered_rate(self) -> float:
        return self.answered / self.seconds

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    @property
    def cpu_us_per_answer(self) -> float:
        return self.cpu_s * 1e6 / self.answered if self.answered else float("inf")

    @property
    def user_us_per_answer(self) -> float:
        return self.user_s * 1e6 / self.answered if self.answered else float("inf")

    @property
    def busy_us_per_answer(self) -> float:
        return self.busy_s * 1e6 / self.answered if self.answered else float("inf")


class Harness:
    def __init__(self, generator: Path, port: int, sources: int, generator_cpu: int,
                 server_cpus: list[int]) -> None:
        self.server_cpus = server_cpus
        self.generator = generator
        self.port = port
        self.sources = sources
        self.generator_cpu = generator_cpu
        self.next_source = 0
        self.counters = Counters(port)

    def step(self, server: ServerRun, rate: float, seconds: float) -> Step:
        pid = server.process.pid
        offered0, answered0 = self.counters.read()
        user0, system0, wait0 = cpu_ticks(pid)
        busy0 = busy_seconds(self.server_cpus)
        started = time.monotonic()
        output = run(["taskset", "-c", str(self.generator_cpu), str(self.generator),
                      "127.0.0.1", str(self.port), f"{rate:.0f}", f"{seconds:.3f}",
                      str(self.sources), str(GENERATOR_PORT), "0.2", str(self.next_source)],
                     timeout=seconds + 30).stdout
        report = json.loads(output)
        self.next_source = (self.next_source + report["sent"]) % self.sources
        # The server may still be working through its socket queue: wait (bounded)
        # until the reply counter stands still.
        last = -1
        for _ in range(40):
            offered, answered = self.counters.read()
            if answered == last:
                break
            last = answered
            time.sleep(0.05)
        user1, system1, wait1 = cpu_ticks(pid)
        busy1 = busy_seconds(self.server_cpus)
        elapsed = time.monotonic() - started
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} died:\n{server.log_path.read_text()[-2000:]}")
        return Step(rate=rate, seconds=report["send_seconds"], sent=report["sent"],
                    offered=offered - offered0, answered=answered - answered0,
                    received=report["received"], kods=report["kod"],
                    user_s=(user1 - user0) / CLK_TCK, system_s=(system1 - system0) / CLK_TCK,
                    cpu_wait_s=min((wait1 - wait0) / 1e9, elapsed), busy_s=busy1 - busy0,
                    server_latency_us=report["server_latency_us"], rtt_us=report["rtt_us"])


@dataclass
class RunResult:
    server: str
    round: int
    best_rate: float = 0.0
    best: Step | None = None
    double: Step | None = None
    steps: list[Step] = field(default_factory=list)


def measure_server(harness: Harness, server: ServerRun, args: argparse.Namespace,
                   round_number: int) -> RunResult:
    result = RunResult(server.name, round_number)
    # Warm-up: every source twice, so that guardntp tracks them all (a first request
    # is only remembered as a newcomer; the second admits the source to the table)
    # and chronyd's client log sees the same sequence. Measured steps are then the
    # steady state: known sources, each asking once per --sources packets.
    warm_seconds = harness.sources / args.warm_rate
    for number in range(args.warm_passes):
        warm = harness.step(server, args.warm_rate, warm_seconds)
        print(f"    {server.name:8s} warm-up pass {number + 1}: {warm.answered_rate / 1e3:.1f}k/s "
              f"answered of {warm.rate / 1e3:.1f}k/s, {warm.cpu_us_per_answer:.2f} us CPU/answer",
              flush=True)
    low, high = 0.0, float(args.max_rate)
    rate = float(args.start_rate)
    for _ in range(args.max_steps):
        step = harness.step(server, rate, args.step_seconds)
        if step.loss >= LOSS_LIMIT:
            # One more try before calling a rate too high: on a shared machine a
            # neighbour's burst can cost either server a step.
            again = harness.step(server, rate, args.step_seconds)
            step = min(step, again, key=lambda tried: tried.loss)
        result.steps.append(step)
        print(f"    {server.name:8s} {rate / 1e3:7.1f}k/s offered -> "
              f"{step.answered_rate / 1e3:7.1f}k/s answered, loss {step.loss:6.2%}, "
              f"{step.cpu_us_per_answer:5.2f} us CPU/answer "
              f"({step.busy_us_per_answer:5.2f} busy), "
              f"latency p50 {step.server_latency_us['p50']:.0f} us", flush=True)
        if step.loss < LOSS_LIMIT:
            low = rate
            if result.best is None or rate > result.best_rate:
                result.best_rate, result.best = rate, step
            rate = min(rate * 1.3, high) if high == args.max_rate else (low + high) / 2
            if rate <= low:
                break
        else:
            high = rate
            rate = (low + high) / 2 if low else rate / 1.5
        if low and high / low < 1.05:
            break
    double_rate = 2 * (result.best_rate or args.start_rate)
    result.double = harness.step(server, double_rate, args.step_seconds)
    d = result.double
    print(f"    {server.name:8s} {double_rate / 1e3:7.1f}k/s offered (2x) -> "
          f"{d.answered_rate / 1e3:7.1f}k/s answered, {d.cpu_us_per_answer:5.2f} us CPU/answer "
          f"({d.busy_us_per_answer:5.2f} busy), "
          f"latency p50 {d.server_latency_us['p50']:.0f} us p99 "
          f"{d.server_latency_us['p99']:.0f} us", flush=True)
    return result


# --------------------------------------------------------------------------- report

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: list[RunResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in ("chronyd", "guardntp"):
        mine = [r for r in results if r.server == name and r.double is not None]
        summary[name] = {
            "best_rate": median([r.best_rate for r in mine]),
            "answered_at_2x": median([r.double.answered_rate for r in mine if r.double]),
            "cpu_us_per_answer_at_best": median([r.best.cpu_us_per_answer for r in mine
                                                 if r.best]),
            "cpu_us_per_answer_at_2x": median([r.double.cpu_us_per_answer for r in mine
                                               if r.double]),
            "user_us_per_answer_at_2x": median([r.double.user_us_per_answer for r in mine
                                                if r.double]),
            "busy_us_per_answer_at_start": median([r.steps[0].busy_us_per_answer
                                                   for r in mine if r.steps]),
            "busy_us_per_answer_at_best": median([r.best.busy_us_per_answer for r in mine
                                                  if r.best]),
            "busy_us_per_answer_at_2x": median([r.double.busy_us_per_answer for r in mine
                                                if r.double]),
            "latency_p50_us_at_best": median([r.best.server_latency_us["p50"] for r in mine
                                              if r.best]),
            "latency_p99_us_at_best": median([r.best.server_latency_us["p99"] for r in mine
                                              if r.best]),
            "latency_p50_us_at_2x": median([r.double.server_latency_us["p50"] for r in mine
                                            if r.double]),
            "latency_p99_us_at_2x": median([r.double.server_latency_us["p99"] for r in mine
                                            if r.double]),
            "cpu_wait_share_at_2x": median([r.double.cpu_wait_s / r.double.seconds
                                            for r in mine if r.double]),
        }
    per_round = []
    for number in sorted({r.round for r in results}):
        pair = {r.server: r for r in results if r.round == number}
        a, b = pair.get("chronyd"), pair.get("guardntp")
        if a and b and a.double and b.double and a.double.answered and a.best_rate:
            per_round.append({
                "round": number,
                "answered_at_2x": b.double.answered_rate / a.double.answered_rate,
                "best_rate": b.best_rate / a.best_rate,
                "cpu_per_answer": (b.double.cpu_us_per_answer / a.double.cpu_us_per_answer),
            })
    summary["ratio_per_round"] = per_round
    summary["ratio"] = {key: median([r[key] for r in per_round])
                        for key in ("answered_at_2x", "best_rate", "cpu_per_answer")}
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\nmedians over rounds                chronyd    guardntp")
    rows = [("highest rate with <1% loss (/s)", "best_rate", "{:10.0f}"),
            ("answered at 2x that load (/s)", "answered_at_2x", "{:10.0f}"),
            ("CPU us per answer at best rate", "cpu_us_per_answer_at_best", "{:10.2f}"),
            ("CPU us per answer at 2x", "cpu_us_per_answer_at_2x", "{:10.2f}"),
            ("  of which user space", "user_us_per_answer_at_2x", "{:10.2f}"),
            ("CPU busy us per answer, first step", "busy_us_per_answer_at_start", "{:10.2f}"),
            ("CPU busy us per answer at best rate", "busy_us_per_answer_at_best", "{:10.2f}"),
            ("CPU busy us per answer at 2x", "busy_us_per_answer_at_2x", "{:10.2f}"),
            ("latency p50 us at best rate", "latency_p50_us_at_best", "{:10.0f}"),
            ("latency p99 us at best rate", "latency_p99_us_at_best", "{:10.0f}"),
            ("latency p50 us at 2x", "latency_p50_us_at_2x", "{:10.0f}"),
            ("latency p99 us at 2x", "latency_p99_us_at_2x", "{:10.0f}"),
            ("share of time waiting for CPU at 2x", "cpu_wait_share_at_2x", "{:10.2f}")]
    for label, key, form in rows:
        print(f"{label:34s}{form.format(summary['chronyd'][key])}  "
              f"{form.format(summary['guardntp'][key])}")
    for row in summary["ratio_per_round"]:
        print(f"round {row['round']}: guardntp/chronyd answered at 2x "
              f"{row['answered_at_2x']:.3f}, best rate {row['best_rate']:.3f}, "
              f"CPU per answer {row['cpu_per_answer']:.3f}")
    ratio = summary["ratio"]
    print(f"RATIO guardntp/chronyd (median of rounds): answered at 2x "
          f"{ratio['answered_at_2x']:.3f}, highest rate under 1% loss {ratio['best_rate']:.3f}")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in run(["lscpu"]).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": os.uname().release,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": sys.version.split()[0],
            "chronyd": run(["chronyd", "-v"]).stdout.split("(")[0].strip()}


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    parser.add_argument("--sources", type=int, default=1_000_000,
                        help="distinct spoofed loopback sources (default 1000000)")
    parser.add_argument("--port", type=int, default=12300,
                        help="server port (default 12300, guardntp's default)")
    parser.add_argument("--server-cpu", default="0",
                        help="taskset CPU list for the server, e.g. 0 or 0,1 with --workers 2")
    parser.add_argument("--generator-cpu", type=int, default=1)
    parser.add_argument("--start-rate", type=float, default=100_000)
    parser.add_argument("--max-rate", type=float, default=1_000_000)
    parser.add_argument("--warm-rate", type=float, default=50_000,
                        help="rate of the warm-up pass over all sources")
    parser.add_argument("--warm-passes", type=int, default=2,
                        help="warm-up passes over all sources before measuring (default 2)")
    parser.add_argument("--step-seconds", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=8, help="search steps per run")
    parser.add_argument("--workers", type=int, default=1, help="guardntp --workers")
    parser.add_argument("--guardntp-set", action="append", default=None, metavar="KEY=VALUE",
                        help="guardntp --set overrides (default: filter.max_sources=2^20)")
    parser.add_argument("--pure-defaults", action="store_true",
                        help="no guardntp overrides at all (max_sources 262144)")
    parser.add_argument("--only", choices=("chronyd", "guardntp"),
                        help="measure one server only (no ratio)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100000 sources, short steps, 3 search steps")
    parser.add_argument("--json", metavar="FILE", help="write every step and the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sources, args.step_seconds, args.max_steps = 100_000, 0.5, 3
        args.start_rate, args.max_rate = 20_000, 50_000
        args.warm_rate, args.warm_passes = 50_000, 1
    if args.guardntp_set is None:
        args.guardntp_set = [] if args.pure_defaults else [f"filter.max_sources={1 << 20}"]
    if not 1 <= args.rounds <= 20 or not 1 <= args.max_steps <= 20 \
            or not 0 <= args.warm_passes <= 5:
        parser.error("--rounds and --max-steps must be 1-20, --warm-passes 0-5")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(NETNS_MARK) != "1":
        missing = [tool for tool in ("unshare", "nft", "gcc", "taskset", "chronyd")
                   if shutil.which(tool) is None]
        if missing or os.geteuid() != 0:
            print(f"side_by_side: needs root and {', '.join(missing) or 'the tools'}",
                  file=sys.stderr)
            return 2
        # Everything below runs in a private network namespace: 127/8 is ours alone.
        command = ["unshare", "-n", "--", sys.executable, str(Path(__file__).resolve()),
                   *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(command, env={**os.environ, NETNS_MARK: "1"})
    run(["ip", "link", "set", "lo", "up"])
    # This script and its nft calls stay off the server's CPUs (busy_seconds).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.generator_cpu})
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, kernel {info['kernel']}, "
          f"load {' '.join(info['loadavg'])}, {info['date']}")
    print(f"guardntp overrides: {args.guardntp_set or 'none'}; sources {args.sources}")
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="guardntp-bench-") as temp:
        work = Path(temp)
        harness = Harness(build_generator(work), args.port, args.sources, args.generator_cpu,
                          cpu_list(args.server_cpu))
        order = [args.only] if args.only else ["chronyd", "guardntp"]
        for round_number in range(1, args.rounds + 1):
            for name in order:
                print(f"round {round_number}: {name}", flush=True)
                server = (start_chronyd(work, args.port, args.server_cpu) if name == "chronyd"
                          else start_guardntp(work, args.port, args.server_cpu,
                                              args.guardntp_set, args.workers))
                try:
                    wait_until_answering(server, args.port)
                    results.append(measure_server(harness, server, args, round_number))
                except RuntimeError as error:   # a server died: say so, go on
                    print(f"    {name}: run lost: {error}", flush=True)
                finally:
                    server.stop()
                    # The server's own account, for diagnosis only (the counts above
                    # come from nftables): guardntp logs its verdict totals at exit.
                    for line in server.log_path.read_text().splitlines():
                        if "stopped:" in line:
                            print(f"    {name} says: {line.split('stopped:', 1)[1].strip()}")
                time.sleep(0.5)
    info["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    summary = summarise(results) if not args.only else {}
    if summary:
        print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "arguments": vars(args), "summary": summary,
             "runs": [{**asdict(r), "best_rate": r.best_rate} for r in results]},
            indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
