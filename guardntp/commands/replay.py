"""``guardntp replay FILE``: replay a capture and score what each class of client got.

In-process always (the real filter and responder, virtual time from the capture);
with ``--live`` also with tcpreplay onto ``lo`` of a private network namespace
against ``guardntp serve`` and/or ``chronyd``, all in one report (``docs/replay.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cli import CommandError
from ..config import ConfigError, apply_overrides, load_config
from ..timestamps import NS_PER_S

#: Upper bound on one live replay's sending time (tcpreplay --duration).
MAX_LIVE_SECONDS = 600.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay", help="replay a capture against the filter (and live servers) and report",
        description="Replay a capture made by `guardntp capture make` (or any pcap of NTP "
        "requests) in-process through the real filter, optionally also live, and report "
        "per scenario and class. See docs/replay.md.")
    parser.add_argument("capture", metavar="FILE", help="pcap file")
    parser.add_argument("-c", "--config", metavar="TOML",
                        help="guardntp configuration whose [filter] to use (default: built-in)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration key, e.g. filter.max_sources=1000")
    parser.add_argument("--live", action="store_true",
                        help="also replay with tcpreplay in a private network namespace "
                        "(root; tcpreplay, nftables)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, metavar="PPS",
                        help="live: send at this many packets per second")
    timing.add_argument("--speed", type=float, metavar="X",
                        help="live: send at X times the capture's own timing (default 1)")
    parser.add_argument("--against", nargs="+", choices=("guardntp", "chronyd"),
                        default=["guardntp"], help="live: server(s) to replay against")
    parser.add_argument("--max-seconds", type=float, default=120.0, metavar="S",
                        help="live: replay the first S seconds of the capture (S x speed "
                        "capture-seconds, or S x rate packets; default 120); every run, the "
                        "in-process one included, is scored on those packets")
    parser.add_argument("--chronyd-ratelimit", choices=("default", "guardntp"),
                        default="default",
                        help="live chronyd: chrony's default `ratelimit` (interval 3 burst 8 "
                        "leak 2; the default) or `guardntp`, the 4x looser `ratelimit "
                        "interval 1 burst 16 leak 2` closest to guardntp's defaults")
    parser.add_argument("--report-dir", metavar="DIR",
                        help="write report.txt, report.json and report.png here")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a required target is missed")
    parser.add_argument("--strict", action="store_true",
                        help="with --check: aspirational targets (known misses, labelled so "
                        "in the report) count too")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..replay import report as reporting
    from ..replay.inprocess import replay_in_process
    from ..replay.live import LiveError, check_live_prerequisites, replay_live, window_packets
    from ..replay.pcap import PcapError
    from ..replay.sidecar import SidecarError, read_labels, read_meta, sidecar_paths

    capture = Path(args.capture)
    if not args.capture.strip():
        raise CommandError("the capture file name is empty", 2)
    if capture.is_dir():
        raise CommandError(f"{capture}: is a directory, not a pcap file", 2)
    if not capture.is_file():
        raise CommandError(f"{capture}: no such file", 2)
    for name in ("rate", "speed"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise CommandError(f"--{name} must be positive", 2)
        if value is not None and not math.isfinite(value):
            raise CommandError(f"--{name} must be a finite number", 2)
    if not 0 < args.max_seconds <= MAX_LIVE_SECONDS:
        raise CommandError(f"--max-seconds must be in (0, {MAX_LIVE_SECONDS:g}]", 2)
    try:
        config = apply_overrides(load_config(args.config), args.set)
    except ConfigError as error:
        raise CommandError(str(error), 2) from None
    policy = config.filter
    labels_path, meta_path = sidecar_paths(capture)
    try:
        labels = read_labels(labels_path) if labels_path.exists() else None
        meta: dict[str, Any] = read_meta(meta_path) if meta_path.exists() else {}
        if args.live:
            if labels is None or not meta:
                raise CommandError(f"--live needs {labels_path.name} and {meta_path.name} "
                                   "beside the capture (made by `guardntp capture make`)", 2)
            check_live_prerequisites(args.against)
    except (SidecarError, LiveError) as error:
        raise CommandError(str(error)) from None
    if policy.random_seed is None:
        policy = replace(policy, random_seed=int(meta.get("seed", 0)))
    settings = {"config": args.config or "built-in defaults", **_overrides(args.set)}

    report = reporting.Report({"path": str(capture), **{k: meta[k] for k in (
        "packets", "seed", "scale", "duration_s") if k in meta},
        "scenarios": [s["name"] for s in meta.get("scenarios", [])]})
    try:
        # Live runs send the first --max-seconds of the capture; every run is scored on
        # those same packets, the in-process one included.
        window = window_packets(capture, args.rate, args.speed, args.max_seconds) \
            if args.live else None
        run_result = replay_in_process(capture, policy, labels, settings,
                                       None if args.quiet else _progress("in-process"),
                                       max_packets=window)
        report.runs.append(run_result)
        if args.live:
            serve_args = (["--config", args.config] if args.config else []) + \
                [f"--set={item}" for item in args.set]
            for server in args.against:
                if not args.quiet:
                    print(f"live replay against {server} ...", file=sys.stderr)
                report.runs.append(replay_live(capture, meta, labels or read_labels(labels_path),
                                               server, args.rate, args.speed, args.max_seconds,
                                               serve_args if server == "guardntp" else [],
                                               window, args.chronyd_ratelimit))
    except (PcapError, SidecarError, LiveError) as error:
        raise CommandError(str(error)) from None
    order = report.capture.get("scenarios") or []
    klass_of = {s["name"]: s["class"] for s in meta.get("scenarios", [])}
    for result in report.runs:
        present = {group.scenario for group in result.groups}
        result.groups += [reporting.GroupResult(name, klass_of[name]) for name in order
                          if name not in present]
        result.groups.sort(key=lambda g: order.index(g.scenario) if g.scenario in order
                           else len(order))
    reporting.evaluate(report)

    if args.json:
        print(json.dumps(reporting.to_json(report), indent=1))
    else:
        print(reporting.render_text(report), end="")
    if args.report_dir:
        try:
            paths = reporting.write_report(report, Path(args.report_dir), not args.no_plot)
        except OSError as error:
            raise CommandError(f"{error.filename or args.report_dir}: cannot write: "
                               f"{error.strerror}") from None
        except ImportError:
            raise CommandError("report.png needs matplotlib: pip install 'guardntp[tools]' "
                               "(or use --no-plot)") from None
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    passed = report.strictly_ok if args.strict else report.ok
    return 1 if args.check and not passed else 0


def _overrides(assignments: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in assignments if "=" in item)


def _progress(label: str) -> Any:
    started = time.monotonic()
    last = [started]

    def show(packets: int, t_ns: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            print(f"{label}: {packets:,} packets, {t_ns / NS_PER_S:,.0f} capture-s "
                  f"({packets / (now - started):,.0f} packets/s)", file=sys.stderr)

    return show
