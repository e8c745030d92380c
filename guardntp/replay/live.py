"""Live replay: tcpreplay onto ``lo`` of a private network namespace, against a real server.

Rule: nothing here touches the host's network. :func:`replay_live` starts this
module as a worker under ``unshare -n``; the worker refuses to run unless it sees
only ``lo`` (so it cannot be in the host's namespace), then, inside it only:

* sets ``lo`` up, ``route_localnet=1`` (packets to 127.0.0.1 arriving on lo, and
  replies from 127.0.0.1 leaving by another device, are martians otherwise) and
  ``rp_filter=0`` (replies to the captured sources route out by the sink, not lo);
* adds a veth pair, ARP off, with default routes through it: replies to the
  captured (documentation, private) sources leave by it and are discarded;
* counts, with nftables, requests in (input hook) and replies out (output hook)
  per scenario address block, telling KoDs (stratum 0) from time replies, and time
  replies per destination address of the abusive blocks (dynamic sets with a
  counter per element): the server's own counters are not trusted;
* starts ``guardntp serve`` or ``chronyd -x -d`` (chrony's default ``ratelimit``,
  i.e. interval 3 burst 8 leak 2, or with ``--chronyd-ratelimit guardntp`` the one
  4x looser one guardntp's old defaults matched, ``interval 1 burst 16 leak 2``) on port 123;
* reads the server's CPU time from /proc/PID/stat, runs tcpreplay on exactly the
  first N packets of the capture (``--limit``; N is the window the parent chose, the
  same for every server; ``--duration`` only as a safety bound), samples the
  counters twice a second, and writes a JSON result.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .pcap import parse_udp, read_frames
from .report import VERDICTS, GroupResult, RunResult, score_excess
from .scenarios import ABUSIVE, SERVER_PORT
from .sidecar import Labels

TABLE = "guardntp_replay"
SINK = "gntp-sink"
SAMPLE_S = 0.5
#: Bytes of IP + UDP header per family, to turn the counters' L3 bytes into NTP bytes.
HEADER_BYTES = {4: 28, 6: 48}
#: chronyd's ``ratelimit`` line: chrony's defaults (``ratelimit`` alone is interval 3,
#: i.e. 1 per 8 s, burst 8, leak 2: guardntp's one-client allowance too), or a 4x looser
#: one (0.5/s, burst 16, 1 in 4 leaked: guardntp's defaults before the crowd estimate).
CHRONY_RATELIMITS = {"default": "ratelimit",
                     "guardntp": "ratelimit interval 1 burst 16 leak 2"}
CHRONY_RATELIMIT_MEANING = {"default": "ratelimit (chrony's defaults: interval 3 burst 8 "
                                       "leak 2)",
                            "guardntp": "ratelimit interval 1 burst 16 leak 2 (guardntp's old "
                                        "defaults, 4x looser than chrony's)"}
#: `local` makes chronyd serve its clock without any source.
CHRONY_CONF = """\
port {port}
bindaddress 127.0.0.1
bindaddress ::1
allow all
local stratum 10
{ratelimit}
pidfile {dir}/chronyd.pid
bindcmdaddress {dir}/chronyd.sock
cmdport 0
"""
SERVERS = ("guardntp", "chronyd")


def safety_seconds(max_seconds: float) -> float:
    """tcpreplay's --duration: only a bound on a slow send, the window is --limit packets."""
    return 2 * max_seconds + 10


class LiveError(Exception):
    """The live replay cannot run here; the message is one line and says why."""


# ---------------------------------------------------------------------- parent side

def check_live_prerequisites(servers: list[str]) -> None:
    if os.geteuid() != 0:
        raise LiveError("the live replay needs root (it makes a private network namespace)")
    needed = ["unshare", "ip", "nft", "tcpreplay"] + (["chronyd"] if "chronyd" in servers
                                                      else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise LiveError("the live replay needs " + ", ".join(missing) +
                        " (Debian packages: util-linux iproute2 nftables tcpreplay chrony)")


def window_packets(capture: Path, rate_pps: float | None, speed: float | None,
                   max_seconds: float) -> int:
    """How many packets from the start of ``capture`` a live replay of ``max_seconds``
    sends: ``rate x S`` at ``--rate``, else those within ``speed x S`` capture-seconds of
    the first. Every server (and the in-process run beside them) is scored on these."""
    total = 0
    first_ns: int | None = None
    limit_ns = int(max_seconds * (speed or 1.0) * 1e9)
    cap = int(rate_pps * max_seconds) if rate_pps else None
    for t_ns, _ in read_frames(str(capture)):
        if first_ns is None:
            first_ns = t_ns
        if (cap is not None and total >= cap) or (cap is None and t_ns - first_ns >= limit_ns):
            break
        total += 1
    return max(1, total)


def replay_live(capture: Path, meta: dict[str, Any], labels: Labels, server: str,
                rate_pps: float | None, speed: float | None, max_seconds: float,
                serve_args: list[str], window: int | None = None,
                chronyd_ratelimit: str = "default") -> RunResult:
    """Run the worker in a fresh network namespace and turn its counters into a RunResult.

    ``window`` packets from the start of the capture are sent (default: what
    :func:`window_packets` gives for ``max_seconds``)."""
    check_live_prerequisites([server])
    if chronyd_ratelimit not in CHRONY_RATELIMITS:
        raise LiveError(f"chronyd ratelimit {chronyd_ratelimit!r}: one of "
                        + ", ".join(CHRONY_RATELIMITS))
    if window is None:
        window = window_packets(capture, rate_pps, speed, max_seconds)
    bound_s = safety_seconds(max_seconds)
    with tempfile.TemporaryDirectory(prefix="guardntp-live-") as work:
        result_path = Path(work) / "result.json"
        command = ["unshare", "-n", sys.executable, "-m", "guardntp.replay.live",
                   "--capture", str(capture), "--meta", json.dumps(meta["scenarios"]),
                   "--server", server, "--max-seconds", str(bound_s),
                   "--limit", str(window), "--chronyd-ratelimit", chronyd_ratelimit,
                   "--work-dir", work, "--result", str(result_path)]
        if rate_pps:
            command += ["--rate", str(rate_pps)]
        if speed:
            command += ["--speed", str(speed)]
        for arg in serve_args:
            command.append(f"--serve-arg={arg}")
        try:
            finished = subprocess.run(command, capture_output=True, text=True,
                                      timeout=bound_s + 60, check=False)
        except subprocess.TimeoutExpired:
            raise LiveError(f"the live replay took longer than {bound_s + 60:.0f} s") \
                from None
        if finished.returncode != 0 or not result_path.exists():
            lines = (finished.stderr or finished.stdout or "no output").strip().splitlines()
            raise LiveError(f"live replay against {server} failed: {lines[-1]}")
        result = json.loads(result_path.read_text())
    return _to_run(result, capture, meta, labels, server, rate_pps, speed, window,
                   chronyd_ratelimit)


def capture_sources(capture: Path, labels: Labels, packets: int
                    ) -> tuple[dict[str, dict[str, list[int]]], float]:
    """Per scenario, per source address (as text): [requests, first ns, last ns] over the
    first ``packets`` packets of the capture, and the capture-seconds they span."""
    by_scenario: dict[str, dict[str, list[int]]] = {}
    first_ns = last_ns = None
    for index, (t_ns, frame) in enumerate(read_frames(str(capture))):
        if index >= packets or index >= len(labels.group_of_packet):
            break
        first_ns = t_ns if first_ns is None else first_ns
        last_ns = t_ns
        datagram = parse_udp(frame)
        if datagram is None or datagram[3] != SERVER_PORT:
            continue
        scenario = labels.groups[labels.group_of_packet[index]][0]
        address = ipaddress.ip_address(datagram[0]).compressed
        record = by_scenario.setdefault(scenario, {}).get(address)
        if record is None:
            by_scenario[scenario][address] = [1, t_ns, t_ns]
        else:
            record[0] += 1
            record[2] = t_ns
    span_s = (last_ns - first_ns) / 1e9 if first_ns is not None and last_ns is not None else 0.0
    return by_scenario, span_s


def _to_run(result: dict[str, Any], capture: Path, meta: dict[str, Any], labels: Labels,
            server: str, rate_pps: float | None, speed: float | None, window: int,
            chronyd_ratelimit: str = "default") -> RunResult:
    sent = int(result["sent"])
    scenarios = meta["scenarios"]
    requests = dict.fromkeys((s["name"] for s in scenarios), 0)
    for group_index in labels.group_of_packet[:sent]:
        scenario_name = labels.groups[group_index][0]
        requests[scenario_name] = requests.get(scenario_name, 0) + 1
    sources, window_s = capture_sources(capture, labels, sent)
    time_by_source: dict[str, int] = {str(k): int(v)
                                      for k, v in result.get("time_by_source", {}).items()}
    final = result["samples"][-1]["counters"] if result["samples"] else {}
    def count(kind: str, index: int, family: int) -> tuple[int, int]:
        """(packets, NTP bytes) of one counter."""
        packets, size = final.get(f"{kind}_{index}_{family}", (0, 0))
        return int(packets), int(size) - int(packets) * HEADER_BYTES[family]

    groups: list[GroupResult] = []
    for index, scenario in enumerate(scenarios):
        name = scenario["name"]
        group = GroupResult(name, scenario["class"], requests=requests.get(name, 0),
                            sources=len(sources.get(name, {})))
        if scenario["class"] == ABUSIVE:
            group.excess, group.excess_served = score_excess(
                (r[0], r[2] - r[1], time_by_source.get(address, 0))
                for address, r in sources.get(name, {}).items())
        for family in (4, 6):
            time_packets, time_bytes = count("time", index, family)
            kod_packets, kod_bytes = count("kod", index, family)
            _, in_bytes = count("in", index, family)
            group.time += time_packets
            group.kod += kod_packets
            group.bytes_out += time_bytes + kod_bytes
            group.bytes_in += in_bytes
        group.drop = group.requests - group.time - group.kod
        groups.append(group)
    timeline = _timeline(result["samples"], scenarios)
    settings: dict[str, Any] = {"rate": f"{rate_pps:g} pps" if rate_pps else
                                f"x{speed:g} capture timing" if speed else "capture timing"}
    if server == "chronyd":
        settings["chronyd"] = CHRONY_RATELIMIT_MEANING[chronyd_ratelimit]
    run = RunResult(f"live {server}", "live", server, groups, timeline=timeline,
                    replay_s=float(result["wall_s"]), wall_s=float(result["wall_s"]),
                    cpu_s=float(result["cpu_s"]), delivered=int(result["delivered"]),
                    settings=settings, window_packets=sent, window_s=window_s)
    total = int(meta.get("packets", sent))
    if sent < window:
        run.notes.append(f"tcpreplay sent {sent} of the {window} packets of the window (its "
                         "safety time bound was reached): this run is scored on fewer "
                         "packets than the others")
    elif window < total:
        run.notes.append(f"scored the first {window} of the capture's {total} packets")
    by_name = {group.scenario: group for group in groups}
    for first, second in shared_blocks(scenarios):
        run.notes.append(f"{first} and {second} share address blocks: the live counters "
                         "cannot tell their replies apart, so neither is scored live "
                         "(requests are counted from the labels; replies, bytes and the "
                         "timeline are the block's); the in-process run scores them")
        for name, other in ((first, second), (second, first)):
            group = by_name[name]
            group.unscored = f"shares its address block with {other}"
            group.drop = max(0, group.requests - group.time - group.kod)
    if result.get("time_by_source_dropped"):
        run.notes.append("the per-source reply sets filled up: per-source counts are low")
    if result.get("socket_drops"):
        run.notes.append(f"{result['socket_drops']} requests overflowed the server's socket "
                         "buffer (the server could not keep up)")
    lost = sent - int(result["delivered"])
    if lost > 0:
        run.notes.append(f"{lost} requests never reached the input hook (kernel backlog)")
    return run


def _timeline(samples: list[dict[str, Any]], scenarios: list[dict[str, Any]]
              ) -> dict[str, dict[str, list[int]]]:
    """Per wall second since tcpreplay started, per scenario: time / kod / not answered
    (requests in minus replies out over the interval, never below 0)."""
    seconds = int(samples[-1]["t"]) + 1 if samples else 0
    timeline = {s["name"]: {v: [0] * seconds for v in VERDICTS} for s in scenarios}
    previous: dict[str, list[int]] = {}
    for sample in samples:
        second = min(seconds - 1, max(0, int(sample["t"])))
        counters = sample["counters"]
        for index, scenario in enumerate(scenarios):
            series = timeline[scenario["name"]]
            delta = {}
            for kind in ("in", "time", "kod"):
                now = sum(int(counters.get(f"{kind}_{index}_{f}", (0, 0))[0]) for f in (4, 6))
                before = sum(int(previous.get(f"{kind}_{index}_{f}", (0, 0))[0]) for f in (4, 6))
                delta[kind] = now - before
            series["time"][second] += delta["time"]
            series["kod"][second] += delta["kod"]
            series["drop"][second] += max(0, delta["in"] - delta["time"] - delta["kod"])
        previous = counters
    return timeline


def shared_blocks(scenarios: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of scenarios whose address blocks overlap (``spoofed-victim`` and
    ``victim-spoofer`` send from the same addresses): nftables counts by block, so live
    it cannot tell their requests or replies apart."""
    blocks = [(s["name"], [ipaddress.ip_network(n) for n in s["networks"]]) for s in scenarios]
    return [(first, second) for index, (first, mine) in enumerate(blocks)
            for second, theirs in blocks[index + 1:]
            if any(a.version == b.version and a.overlaps(b)
                   for a in mine for b in theirs)]


# ---------------------------------------------------------------------- worker (in the namespace)

def _run(*args: str, input_text: str | None = None) -> str:
    done = subprocess.run(args, input=input_text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LiveError(f"{' '.join(args[:3])}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


def _in_private_namespace() -> bool:
    """Only lo exists: a fresh `unshare -n` namespace, never the host's."""
    names = [line.split(":")[1].strip().split("@")[0]
             for line in _run("ip", "-o", "link", "show").splitlines() if ":" in line]
    return names == ["lo"]


def _setup_namespace() -> None:
    if not _in_private_namespace():
        raise LiveError("refusing to configure the network: not in a fresh private namespace")
    _run("ip", "link", "set", "lo", "up")
    for name, value in (("net.ipv4.conf.all.route_localnet", "1"),
                        ("net.ipv4.conf.lo.route_localnet", "1"),
                        ("net.ipv4.conf.all.rp_filter", "0"),
                        ("net.ipv4.conf.default.rp_filter", "0"),
                        ("net.ipv4.conf.lo.rp_filter", "0")):
        _write_sysctl(name, value)
    _run("ip", "link", "add", SINK, "type", "veth", "peer", "name", SINK + "-peer")
    _run("ip", "link", "set", SINK, "arp", "off", "up")
    _run("ip", "link", "set", SINK + "-peer", "up")
    _run("ip", "route", "add", "default", "dev", SINK)
    _run("ip", "-6", "route", "add", "default", "dev", SINK)


def nft_ruleset(scenarios: list[dict[str, Any]], set_size: int = 1 << 16) -> str:
    """Counters in_I_F, time_I_F, kod_I_F per scenario I and family F (4 or 6), and the
    sets tsrc4 / tsrc6 counting time replies per destination of the abusive blocks."""
    counters, inputs, outputs = [], [], []
    counters += [f"  set tsrc4 {{ type ipv4_addr; flags dynamic; counter; size {set_size}; }}",
                 f"  set tsrc6 {{ type ipv6_addr; flags dynamic; counter; size {set_size}; }}"]
    port = SERVER_PORT
    for index, scenario in enumerate(scenarios):
        by_family: dict[int, list[str]] = {}
        for cidr in scenario["networks"]:
            network = ipaddress.ip_network(cidr)
            by_family.setdefault(network.version, []).append(str(network))
        for family, networks in sorted(by_family.items()):
            match = "ip" if family == 4 else "ip6"
            nets = "{ " + ", ".join(networks) + " }"
            for kind in ("in", "time", "kod"):
                counters.append(f"  counter {kind}_{index}_{family} {{}}")
            inputs.append(f"    udp dport {port} {match} saddr {nets} "
                          f"counter name in_{index}_{family}")
            # A KoD is stratum 0 (byte 1 of the NTP header, bits 72-79 after the UDP header).
            outputs.append(f"    udp sport {port} {match} daddr {nets} @th,72,8 0 "
                           f"counter name kod_{index}_{family} accept")
            per_source = (f"add @tsrc{family} {{ {match} daddr }} "
                          if scenario.get("class") == ABUSIVE else "")
            outputs.append(f"    udp sport {port} {match} daddr {nets} {per_source}"
                           f"counter name time_{index}_{family} accept")
    return "\n".join([
        f"table inet {TABLE} {{", *counters,
        "  chain input {", "    type filter hook input priority -150; policy accept;", *inputs,
        "  }",
        "  chain output {", "    type filter hook output priority -150; policy accept;",
        *outputs, "  }", "}", ""])


def read_counters() -> dict[str, tuple[int, int]]:
    data = json.loads(_run("nft", "-j", "list", "counters", "table", "inet", TABLE))
    counters = {}
    for item in data.get("nftables", []):
        counter = item.get("counter")
        if counter:
            counters[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
    return counters


def read_source_counts() -> dict[str, int]:
    """Time replies per destination address (the abusive blocks' sets)."""
    counts: dict[str, int] = {}
    for name in ("tsrc4", "tsrc6"):
        data = json.loads(_run("nft", "-j", "list", "set", "inet", TABLE, name))
        for item in data.get("nftables", []):
            for element in (item.get("set") or {}).get("elem", []):
                entry = element.get("elem", {})
                counter = entry.get("counter") or {}
                counts[str(entry.get("val"))] = int(counter.get("packets", 0))
    return counts


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_socket_drops(port: int) -> int:
    """Datagrams the kernel dropped at sockets bound to ``port`` (/proc/net/udp{,6})."""
    drops = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 12 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                drops += int(fields[-1])
    return drops


def _start_server(server: str, work: Path, serve_args: list[str],
                  chronyd_ratelimit: str = "default") -> subprocess.Popen[bytes]:
    log = open(work / f"{server}.log", "wb")  # noqa: SIM115 -- lives as long as the server
    if server == "guardntp":
        args = [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{SERVER_PORT}",
                "--listen", f"[::1]:{SERVER_PORT}", "--clock", "local",
                "--state-dir", str(work / "state"), *serve_args]
    else:
        conf = work / "chrony.conf"
        os.chmod(work, 0o700)
        conf.write_text(CHRONY_CONF.format(port=SERVER_PORT, dir=work,
                                           ratelimit=CHRONY_RATELIMITS[chronyd_ratelimit]))
        args = ["chronyd", "-x", "-d", "-u", "root", "-f", str(conf)]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_answering(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    from .. import client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LiveError(f"the server exited with status {process.returncode}")
        try:
            client.exchange("127.0.0.1", SERVER_PORT, timeout_s=0.3)
            return
        except (OSError, client.BogusReply, client.KissOfDeath):
            time.sleep(0.1)
    raise LiveError(f"the server did not answer within {timeout_s:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = json.loads(args.meta)
    work = Path(args.work_dir)
    _setup_namespace()
    abusive_addresses = sum(int(s.get("addresses", 0)) for s in scenarios
                            if s.get("class") == ABUSIVE)
    set_size = min(1 << 24, max(1 << 16, 2 * abusive_addresses))
    _run("nft", "-f", "-", input_text=nft_ruleset(scenarios, set_size))
    process = _start_server(args.server, work, args.serve_arg, args.chronyd_ratelimit)
    try:
        _wait_until_answering(process)
        drops_before = udp_socket_drops(SERVER_PORT)
        cpu_before = process_cpu_s(process.pid)
        replay = ["tcpreplay", "-i", "lo", "--preload-pcap", "--no-flow-stats",
                  f"--duration={max(1, int(args.max_seconds))}"]
        if args.limit:
            replay.append(f"--limit={args.limit}")
        if args.rate:
            replay.append(f"--pps={args.rate:g}")
        elif args.speed:
            replay.append(f"--multiplier={args.speed:g}")
        replay.append(args.capture)
        samples: list[dict[str, Any]] = []
        tcpreplay = subprocess.Popen(replay, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        started = time.monotonic()
        while tcpreplay.poll() is None:
            time.sleep(SAMPLE_S)
            samples.append({"t": time.monotonic() - started, "counters": read_counters()})
        output, errors = tcpreplay.communicate()
        wall_s = time.monotonic() - started
        if tcpreplay.returncode != 0:
            raise LiveError(f"tcpreplay: {(errors or output).strip().splitlines()[-1]}")
        time.sleep(SAMPLE_S)  # let the server drain its socket buffer
        samples.append({"t": time.monotonic() - started, "counters": read_counters()})
        cpu_s = process_cpu_s(process.pid) - cpu_before
        socket_drops = udp_socket_drops(SERVER_PORT) - drops_before
        time_by_source = read_source_counts()
    finally:
        _stop(process)
    sent = _parse_sent(output)
    final: dict[str, tuple[int, int]] = samples[-1]["counters"]
    delivered = sum(packets for name, (packets, _) in final.items() if name.startswith("in_"))
    return {"sent": sent, "wall_s": wall_s, "cpu_s": cpu_s, "delivered": delivered,
            "socket_drops": socket_drops, "samples": samples, "tcpreplay": output.strip(),
            "time_by_source": time_by_source,
            "time_by_source_dropped": len(time_by_source) >= set_size}


def _parse_sent(output: str) -> int:
    for line in output.splitlines():
        if line.strip().startswith("Actual:"):
            return int(line.split()[1])
    raise LiveError("tcpreplay did not report what it sent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="guardntp live replay worker (run by "
                                     "`guardntp replay --live` under unshare -n)")
    parser.add_argument("--capture", required=True)
    parser.add_argument("--meta", required=True, help="the capture's scenarios as JSON")
    parser.add_argument("--server", choices=SERVERS, required=True)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--speed", type=float)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--limit", type=int, default=0, help="send this many packets")
    parser.add_argument("--chronyd-ratelimit", choices=sorted(CHRONY_RATELIMITS),
                        default="default")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--serve-arg", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        result = worker(args)
    except (LiveError, OSError) as error:
        print(f"guardntp live replay: {error}", file=sys.stderr)
        return 1
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
