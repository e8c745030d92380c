"""``guardntp capture make SCENARIO... -o FILE``: write a labelled pcap of floods and clients.

``guardntp capture list`` names the scenarios and mixes (``docs/replay.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ..cli import CommandError
from ..timestamps import NS_PER_S

#: Longest capture accepted (a day of virtual time); the packet count is what costs.
MAX_DURATION_S = 86_400.0
MAX_SCALE = 1000.0
#: The narrowest scenario-name column (the older names fit in it).
NAME_WIDTH = 18


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "capture", help="make labelled pcap captures of documented floods and normal clients",
        description="Make pcap captures (Wireshark and tcpreplay read them) of named, seeded, "
        "scalable scenarios, each packet labelled in FILE.labels.csv; see docs/replay.md.")
    actions = parser.add_subparsers(dest="capture_command", metavar="ACTION")
    make = actions.add_parser("make", help="write a capture of one or more scenarios (a mix)")
    make.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                      help="scenario or mix names (see `guardntp capture list`)")
    make.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="pcap to write; FILE.labels.csv and FILE.meta.json go beside it")
    make.add_argument("--scale", type=float, default=1.0,
                      help="multiply every scenario's clients (or spoofed packet rate)")
    make.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    make.add_argument("--duration", type=float, default=600.0, metavar="S",
                      help="capture length in seconds (default 600)")
    make.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    make.set_defaults(func=run_make)
    listing = actions.add_parser("list", help="list scenarios and mixes")
    listing.set_defaults(func=run_list)
    def usage(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=usage)


def _name_width(names: Iterable[str]) -> int:
    """The scenario-name column: as wide as the longest name, at least NAME_WIDTH."""
    return max([NAME_WIDTH, *map(len, names)])


def run_list(args: argparse.Namespace) -> int:
    from ..replay.scenarios import MIXES, SCALE_ONE, SCENARIOS

    width = _name_width(SCENARIOS)
    for scenario in SCENARIOS.values():
        print(f"{scenario.name:<{width}} {scenario.klass:<10} {scenario.summary}")
        print(f"{'':<{width + 11}} scale 1: {SCALE_ONE[scenario.name]}; "
              f"sources in {', '.join(scenario.networks)}")
    print()
    for name, members in MIXES.items():
        print(f"mix {name:<{width - 4}} {' '.join(members)}")
    return 0


def run_make(args: argparse.Namespace) -> int:
    from ..replay.capture import ScapyMissing, make_capture
    from ..replay.scenarios import resolve_names

    try:
        names = resolve_names(args.scenarios)
    except ValueError as error:
        raise CommandError(str(error), 2) from None
    if not 0 < args.scale <= MAX_SCALE:
        raise CommandError(f"--scale must be in (0, {MAX_SCALE:g}]", 2)
    if not 0 < args.duration <= MAX_DURATION_S:
        raise CommandError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds", 2)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CommandError(f"{out.parent}: no such directory", 2)
    started = time.monotonic()
    last = [started]

    def progress(packets: int, t_ns: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            share = min(1.0, t_ns / (args.duration * NS_PER_S))
            print(f"capture: {packets:,} packets, {share:.0%} of {args.duration:g} s "
                  f"({packets / (now - started):,.0f} packets/s)", file=sys.stderr)

    try:
        meta = make_capture(names, out, args.seed, args.scale, args.duration,
                            None if args.quiet else progress)
    except ScapyMissing as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"{error.filename or out}: cannot write: {error.strerror}") from None
    elapsed = time.monotonic() - started
    print(f"{out}: {meta['packets']:,} packets in {elapsed:.1f} s "
          f"({meta['packets'] / max(elapsed, 1e-9):,.0f} packets/s), seed {args.seed}, "
          f"scale {args.scale:g}, {args.duration:g} s")
    width = _name_width(scenario["name"] for scenario in meta["scenarios"])
    for scenario in meta["scenarios"]:
        print(f"  {scenario['name']:<{width}} {scenario['class']:<10} {scenario['packets']:>9,} "
              f"packets from {scenario['sources']:,} addresses, {scenario['clients']:,} clients")
    return 0
