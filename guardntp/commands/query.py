"""``guardntp query HOST[:PORT]``: the SNTP client."""

from __future__ import annotations

import argparse
import json
import sys

from .. import client
from ..auth.client import Transform, client_key, client_signing
from ..auth.keys import MAX_KEY_ID
from ..cli import CommandError
from ..config import ConfigError
from ..setclock import ClockChangeError, apply_offset
from ..timestamps import short_to_ns
from ..wire import KISS_CODES, Mode, refid_to_text

#: Exit status when the server sent a Kiss-o'-Death (distinct from plain failure).
KOD_STATUS = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("query", help="ask an NTP server for the time (SNTP client)")
    parser.add_argument("server", metavar="HOST[:PORT]", help="server; port 123 when omitted")
    parser.add_argument("-n", "--samples", type=int, default=1,
                        help="exchanges to make (2 s apart); the lowest-delay one is reported")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait per reply")
    parser.add_argument("--ntp-version", type=int, default=4, choices=(1, 2, 3, 4),
                        help="NTP version of the request (default 4)")
    parser.add_argument("--symmetric", action="store_true",
                        help="send mode 1 (symmetric active) like Windows w32time")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--set-clock", action="store_true",
                        help="step or slew the system clock by the offset (needs root)")
    parser.add_argument("--key-file", metavar="FILE",
                        help="symmetric keys in chrony's format (see docs/auth.md)")
    parser.add_argument("--key-id", type=int, metavar="N",
                        help="sign requests and verify replies with key N (without "
                        "--key-file: HMAC-SHA256 with the secret in $NTP_SECRET_KEY)")
    parser.set_defaults(func=run)


def split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "123"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "123"
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise CommandError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT", 2)
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.server)
    if not 1 <= args.samples <= 64:
        raise CommandError("--samples must be 1-64", 2)
    if not 0 < args.timeout <= 60:
        raise CommandError("--timeout must be in (0, 60] seconds", 2)
    mode = Mode.SYMMETRIC_ACTIVE if args.symmetric else Mode.CLIENT
    sign, verify = signing_for(args)
    try:
        best, samples = client.query(host, port, args.samples, args.timeout, args.ntp_version,
                                     mode, sign=sign, verify=verify)
    except client.KissOfDeath as kod:
        meaning = KISS_CODES.get(kod.code, "unknown kiss code")
        if args.json:
            print(json.dumps({"server": args.server, "kod": kod.code, "meaning": meaning}))
        raise CommandError(f"{args.server} sent Kiss-o'-Death {kod.code} ({meaning}); "
                           "not retrying", KOD_STATUS) from None
    except client.BogusReply as error:
        raise CommandError(f"{args.server}: rejected reply: {error}") from None
    except TimeoutError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"{args.server}: {error.strerror or error}") from None
    report = describe(args.server, best, len(samples))
    if args.set_clock:
        try:
            report["clock_change"] = apply_offset(best.offset_ns)
        except ClockChangeError as error:
            raise CommandError(str(error)) from None
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, sys.stdout)
    return 0


def signing_for(args: argparse.Namespace) -> tuple[Transform | None, Transform | None]:
    """(sign, verify) callables for authenticated queries; (None, None) without keys."""
    if args.key_id is None:
        if args.key_file:
            raise CommandError("--key-file needs --key-id N: which key to sign with", 2)
        return None, None
    if not 0 <= args.key_id <= MAX_KEY_ID:
        raise CommandError(f"--key-id must be 0-{MAX_KEY_ID}", 2)
    try:
        key = client_key(args.key_file, args.key_id)
    except ConfigError as error:
        raise CommandError(str(error), 2) from None
    return client_signing(key, args.ntp_version)


def describe(server: str, sample: client.Sample, count: int) -> dict[str, object]:
    packet = sample.packet
    return {
        "server": server,
        "offset": client.seconds(sample.offset_ns),
        "delay": client.seconds(sample.delay_ns),
        "stratum": packet.stratum,
        "refid": refid_to_text(packet.refid, packet.stratum),
        "leap": packet.leap.name.lower(),
        "version": packet.version,
        "precision": packet.precision,
        "root_delay": client.seconds(short_to_ns(packet.root_delay)),
        "root_dispersion": client.seconds(short_to_ns(packet.root_dispersion)),
        "samples": count,
    }


def print_report(report: dict[str, object], out: object) -> None:
    lines = [
        f"server {report['server']}: stratum {report['stratum']}, refid {report['refid']}, "
        f"leap {report['leap']}, version {report['version']}",
        f"offset {report['offset']:+.6f} s, delay {report['delay']:.6f} s "
        f"(best of {report['samples']})",
        f"precision 2^{report['precision']} s, root delay {report['root_delay']:.6f} s, "
        f"root dispersion {report['root_dispersion']:.6f} s",
    ]
    if "clock_change" in report:
        lines.append(f"system clock {report['clock_change']}")
    print("\n".join(lines), file=out)  # type: ignore[call-overload]
