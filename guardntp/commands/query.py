"""``guardntp query HOST[:PORT]``: the SNTP client.

Every outcome has its own exit status and, with ``--json``, one JSON object on
stdout carrying ``outcome`` and ``exit_status``; failures also get one line on
stderr.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import TextIO

from .. import client
from ..auth.client import Transform, client_key, client_signing
from ..auth.keys import MAX_KEY_ID
from ..cli import CommandError
from ..config import ConfigError
from ..setclock import ClockChangeError, apply_offset
from ..timestamps import short_to_ns
from ..wire import KISS_CODES, Mode, NtpPacket, refid_to_text

#: Exit status per outcome. 2 (usage or configuration error) comes before any
#: query and prints no JSON.
EXIT_STATUS = {
    "ok": 0,
    "error": 1,
    "kod": 3,
    "no_reply": 4,
    "rejected": 5,
    "resolve_error": 6,
}
USAGE_STATUS = 2
#: Exit status when the server sent a Kiss-o'-Death (distinct from plain failure).
KOD_STATUS = EXIT_STATUS["kod"]

_PANIC_S = f"{client.seconds(client.PANIC_THRESHOLD_NS):g}"
_DISTANCE_S = f"{client.seconds(client.MAX_ROOT_DISTANCE_NS):g}"
_DISPERSION_S = f"{client.seconds(client.MAX_ROOT_DISPERSION_NS):g}"
EPILOG = f"""\
exit status (with --json, one JSON object on stdout with "outcome" and "exit_status"):
  0  ok             time obtained; an offset beyond {_PANIC_S} s (ntpd's panic threshold)
                    is shown with a warning
  1  error          local failure: socket error, --set-clock refused or failed
  2  (usage)        bad arguments or key file; no JSON
  3  kod            the server sent a Kiss-o'-Death (its code is printed); never retried
  4  no_reply       no reply within --timeout (stray datagrams are ignored and counted)
  5  rejected       a reply without usable time: unsynchronised (LI=3, stratum 0 or 16),
                    root distance over {_DISTANCE_S} s, root dispersion {_DISPERSION_S} s or more,
                    or failing authentication
  6  resolve_error  the host name does not resolve
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("query", help="ask an NTP server for the time (SNTP client)",
                                   epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", metavar="HOST[:PORT]", help="server; port 123 when omitted")
    parser.add_argument("-n", "--samples", type=int, default=1,
                        help="exchanges to make (2 s apart); the lowest-delay one is reported")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait per reply")
    parser.add_argument("--ntp-version", type=int, default=4, choices=(1, 2, 3, 4),
                        help="NTP version of the request (default 4)")
    parser.add_argument("--symmetric", action="store_true",
                        help="send mode 1 (symmetric active) like Windows w32time")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, whatever the outcome")
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
        raise CommandError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT", USAGE_STATUS)
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.server)
    if not 1 <= args.samples <= 64:
        raise CommandError("--samples must be 1-64", USAGE_STATUS)
    if not 0 < args.timeout <= 60:
        raise CommandError("--timeout must be in (0, 60] seconds", USAGE_STATUS)
    mode = Mode.SYMMETRIC_ACTIVE if args.symmetric else Mode.CLIENT
    sign, verify = signing_for(args)
    report, message = outcome(args, host, port, mode, sign, verify)
    status = EXIT_STATUS[str(report["outcome"])]
    report["exit_status"] = status
    if args.json:
        print(json.dumps(report))
    elif status == 0:
        print_report(report, sys.stdout)
    warnings = report.get("warnings")
    for warning in warnings if isinstance(warnings, list) else ():
        print(f"guardntp: warning: {args.server}: {warning}", file=sys.stderr)
    if message is not None:
        sys.stdout.flush()
        raise CommandError(message, status)
    return status


def outcome(args: argparse.Namespace, host: str, port: int, mode: Mode,
            sign: Transform | None, verify: Transform | None,
            ) -> tuple[dict[str, object], str | None]:
    """Run the query: (the JSON report, the one-line error or None when ok)."""
    server = args.server
    try:
        best, samples = client.query(host, port, args.samples, args.timeout, args.ntp_version,
                                     mode, sign=sign, verify=verify)
    except client.KissOfDeath as kod:
        meaning = KISS_CODES.get(kod.code, "unknown kiss code")
        message = f"{server} sent Kiss-o'-Death {kod.code} ({meaning}); not retrying"
        return _failure(server, "kod", message, kod.stats, kod=kod.code, meaning=meaning), \
            message
    except client.BogusReply as error:
        message = f"{server}: rejected reply: {error}"
        extra = {"reply": packet_fields(error.packet)} if error.packet is not None else {}
        return _failure(server, "rejected", message, error.stats, reason=str(error),
                        **extra), message
    except TimeoutError as error:
        stats = error.stats if isinstance(error, client.NoReply) else client.NO_STRAYS
        return _failure(server, "no_reply", str(error), stats), str(error)
    except socket.gaierror as error:
        message = f"{server}: cannot resolve {host}: {error.strerror or error}"
        return _failure(server, "resolve_error", message, client.NO_STRAYS), message
    except OSError as error:
        message = f"{server}: {error.strerror or error}"
        return _failure(server, "error", message, client.NO_STRAYS), message
    stats = sum((sample.stats for sample in samples), client.NO_STRAYS)
    reason = client.usable(best)
    if reason is not None:
        message = f"{server}: rejected reply: {reason}"
        return _failure(server, "rejected", message, stats, reason=reason,
                        reply=packet_fields(best.packet)), message
    report = describe(server, best, len(samples), stats)
    if args.set_clock:
        try:
            report["clock_change"] = apply_offset(best.offset_ns)
        except ClockChangeError as error:
            report["outcome"] = "error"
            report["message"] = str(error)
            return report, str(error)
    return report, None


def _failure(server: str, kind: str, message: str, stats: client.ExchangeStats,
             **extra: object) -> dict[str, object]:
    return {"server": server, "outcome": kind, "message": message, **extra,
            "ignored": stats.counts()}


def signing_for(args: argparse.Namespace) -> tuple[Transform | None, Transform | None]:
    """(sign, verify) callables for authenticated queries; (None, None) without keys."""
    if args.key_id is None:
        if args.key_file:
            raise CommandError("--key-file needs --key-id N: which key to sign with",
                               USAGE_STATUS)
        return None, None
    if not 0 <= args.key_id <= MAX_KEY_ID:
        raise CommandError(f"--key-id must be 0-{MAX_KEY_ID}", USAGE_STATUS)
    try:
        key = client_key(args.key_file, args.key_id)
    except ConfigError as error:
        raise CommandError(str(error), USAGE_STATUS) from None
    return client_signing(key, args.ntp_version)


def packet_fields(packet: NtpPacket) -> dict[str, object]:
    """What a server said of itself, as shown for accepted and rejected replies alike."""
    return {
        "stratum": packet.stratum,
        "refid": refid_to_text(packet.refid, packet.stratum),
        "leap": packet.leap.name.lower(),
        "version": packet.version,
        "precision": packet.precision,
        "root_delay": client.seconds(short_to_ns(packet.root_delay)),
        "root_dispersion": client.seconds(short_to_ns(packet.root_dispersion)),
    }


def describe(server: str, sample: client.Sample, count: int,
             stats: client.ExchangeStats = client.NO_STRAYS) -> dict[str, object]:
    warning = client.panic_warning(sample)
    return {
        "server": server,
        "outcome": "ok",
        "offset": client.seconds(sample.offset_ns),
        "delay": client.seconds(sample.delay_ns),
        **packet_fields(sample.packet),
        "root_distance": client.seconds(sample.root_distance_ns),
        "samples": count,
        "panic": warning is not None,
        "warnings": [warning] if warning else [],
        "ignored": stats.counts(),
    }


def print_report(report: dict[str, object], out: TextIO) -> None:
    flag = "  ** beyond the panic threshold **" if report.get("panic") else ""
    lines = [
        f"server {report['server']}: stratum {report['stratum']}, refid {report['refid']}, "
        f"leap {report['leap']}, version {report['version']}",
        f"offset {report['offset']:+.6f} s, delay {report['delay']:.6f} s "
        f"(best of {report['samples']}){flag}",
        f"precision 2^{report['precision']} s, root delay {report['root_delay']:.6f} s, "
        f"root dispersion {report['root_dispersion']:.6f} s",
    ]
    ignored = report.get("ignored")
    if isinstance(ignored, dict) and ignored:
        lines.append(client.ExchangeStats(**ignored).describe())
    if "clock_change" in report:
        lines.append(f"system clock {report['clock_change']}")
    print("\n".join(lines), file=out)
