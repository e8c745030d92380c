"""``guardntp query HOST[:PORT]``: the SNTP client, plain, with a symmetric key, or
with NTS (``--nts``: NTS-KE, then NTS-authenticated NTPv4).

Every outcome has its own exit status and, with ``--json``, one JSON object on
stdout carrying ``outcome`` and ``exit_status``; failures also get one line on
stderr.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .. import client
from ..auth.client import Transform, client_key, client_signing
from ..auth.keys import MAX_KEY_ID
from ..cli import CommandError, path_argument
from ..config import ConfigError
from ..netaddr import BadAddress, parse_host_port
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
    "nts_ke_failed": 7,
}
USAGE_STATUS = 2
#: Exit status when the server sent a Kiss-o'-Death (distinct from plain failure).
KOD_STATUS = EXIT_STATUS["kod"]
#: RFC 8915 §4: the NTS-KE service's TCP port.
NTS_KE_PORT = 4460
#: RFC 8915's AEAD ids (``guardntp.nts.aead``), by name for the report.
AEAD_NAMES = {15: "AEAD_AES_SIV_CMAC_256", 17: "AEAD_AES_SIV_CMAC_512"}

_PANIC_S = f"{client.seconds(client.PANIC_THRESHOLD_NS):g}"
_DISTANCE_S = f"{client.seconds(client.MAX_ROOT_DISTANCE_NS):g}"
_DISPERSION_S = f"{client.seconds(client.MAX_ROOT_DISPERSION_NS):g}"
EPILOG = f"""\
exit status (with --json, one JSON object on stdout with "outcome" and "exit_status"):
  0  ok             time obtained; an offset beyond {_PANIC_S} s (ntpd's panic threshold)
                    is shown with a warning
  1  error          local failure: socket error, --set-clock refused or failed
  2  (usage)        bad arguments or key file; no JSON
  3  kod            the server sent a Kiss-o'-Death (its code is printed); never retried;
                    with --nts, an NTS NAK (NTSN: the NTP server refused our cookie)
  4  no_reply       no reply within --timeout (stray datagrams are ignored and counted);
                    with --nts also NTS-KE timing out (connect, TLS handshake, response)
  5  rejected       a reply without usable time: unsynchronised (LI=3, stratum 0 or 16),
                    root distance over {_DISTANCE_S} s, root dispersion {_DISPERSION_S} s or more,
                    or failing authentication (a bad MAC, an NTS authenticator that
                    does not verify, a reply that is not NTS-authenticated)
  6  resolve_error  the host name does not resolve
  7  nts_ke_failed  --nts: NTS-KE failed: connection refused, TLS handshake failed or
                    certificate not trusted or not for HOST, an Error record, no cookies

with --nts, HOST is the NTS-KE server (TCP --nts-port, 4460) and the name its certificate
must carry; the NTP server and port are the ones NTS-KE negotiates (default: HOST and
PORT, 123 when omitted); each exchange spends one cookie and asks for fresh ones.
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
    parser.add_argument("--key-file", metavar="FILE", type=path_argument,
                        help="symmetric keys in chrony's format (see docs/auth.md)")
    parser.add_argument("--key-id", type=int, metavar="N",
                        help="sign requests and verify replies with key N (without "
                        "--key-file: HMAC-SHA256 with the secret in $NTP_SECRET_KEY)")
    parser.add_argument("--nts", action="store_true",
                        help="authenticate with NTS (RFC 8915): NTS-KE over TLS 1.3 with "
                        "HOST, then NTS-protected NTPv4")
    parser.add_argument("--nts-ca", metavar="FILE", type=path_argument,
                        help="with --nts: trust only these CA certificates (PEM) for the "
                        "NTS-KE server (default: the system trust store)")
    parser.add_argument("--nts-port", type=int, metavar="N",
                        help=f"with --nts: the NTS-KE TCP port (default {NTS_KE_PORT})")
    parser.set_defaults(func=run)


def split_host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except BadAddress:
        raise CommandError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT (port "
                           "1-65535)", USAGE_STATUS) from None


def run(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.server)
    if not 1 <= args.samples <= 64:
        raise CommandError("--samples must be 1-64", USAGE_STATUS)
    if not 0 < args.timeout <= 60:
        raise CommandError("--timeout must be in (0, 60] seconds", USAGE_STATUS)
    mode = Mode.SYMMETRIC_ACTIVE if args.symmetric else Mode.CLIENT
    if args.nts:
        check_nts_args(args)
        report, message = nts_outcome(args, host, port)
    else:
        if args.nts_ca or args.nts_port is not None:
            raise CommandError("--nts-ca and --nts-port need --nts", USAGE_STATUS)
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
    return _sampled(args, host, lambda: client.query(
        host, port, args.samples, args.timeout, args.ntp_version, mode, sign=sign,
        verify=verify), "symmetric_key" if sign is not None else None)


def _sampled(args: argparse.Namespace, host: str,
             take: Callable[[], tuple[client.Sample, list[client.Sample]]],
             authenticated: str | None, extra: dict[str, object] | None = None,
             nak_hint: str = "") -> tuple[dict[str, object], str | None]:
    """Take the samples and judge them: (the JSON report, the one-line error or None).
    ``authenticated`` (None, ``symmetric_key``, ``nts``) goes into the report of a
    usable sample, ``extra`` into every report; ``host`` is the NTP server's name (for
    a resolve error)."""
    extra = extra or {}
    server = args.server
    try:
        best, samples = take()
    except client.KissOfDeath as kod:
        meaning = KISS_CODES.get(kod.code, "unknown kiss code")
        why = nak_hint if kod.code == "NTSN" and nak_hint else meaning
        message = f"{server} sent Kiss-o'-Death {kod.code} ({why}); not retrying"
        return _failure(server, "kod", message, kod.stats, kod=kod.code, meaning=meaning,
                        **extra), message
    except client.BogusReply as error:
        message = f"{server}: rejected reply: {error}"
        reply = {"reply": packet_fields(error.packet)} if error.packet is not None else {}
        return _failure(server, "rejected", message, error.stats, reason=str(error),
                        **reply, **extra), message
    except TimeoutError as error:
        stats = error.stats if isinstance(error, client.NoReply) else client.NO_STRAYS
        return _failure(server, "no_reply", str(error), stats, **extra), str(error)
    except socket.gaierror as error:
        message = f"{server}: cannot resolve {host}: {error.strerror or error}"
        return _failure(server, "resolve_error", message, client.NO_STRAYS, **extra), message
    except OSError as error:
        message = f"{server}: {error.strerror or error}"
        return _failure(server, "error", message, client.NO_STRAYS, **extra), message
    stats = sum((sample.stats for sample in samples), client.NO_STRAYS)
    reason = client.usable(best)
    if reason is not None:
        message = f"{server}: rejected reply: {reason}"
        return _failure(server, "rejected", message, stats, reason=reason,
                        reply=packet_fields(best.packet), **extra), message
    report = {**describe(server, best, len(samples), stats),
              "authenticated": authenticated, **extra}
    if args.set_clock:
        try:
            report["clock_change"] = apply_offset(best.offset_ns)
        except ClockChangeError as error:
            report["outcome"] = "error"
            report["message"] = str(error)
            return report, str(error)
    return report, None


def nts_modules() -> tuple[Any, Any, Any]:
    """(OpenSSL.SSL, nts.ke_client, nts.client.NtsSession): imported only for ``--nts``,
    so a plain install without the ``nts`` extra still queries."""
    try:
        from OpenSSL import SSL

        from ..nts import ke_client
        from ..nts.client import NtsSession
    except ImportError as error:
        raise CommandError(f"--nts needs the 'nts' extra ({error.name} is missing): "
                           "pip install 'guardntp[nts]'", USAGE_STATUS) from None
    return SSL, ke_client, NtsSession


def check_nts_args(args: argparse.Namespace) -> None:
    """Usage errors of ``--nts`` (exit 2, before any connection)."""
    SSL, ke_client, _ = nts_modules()
    if args.key_id is not None or args.key_file:
        raise CommandError("--nts and --key-id/--key-file exclude each other: NTS brings "
                           "its own keys", USAGE_STATUS)
    if args.symmetric or args.ntp_version != 4:
        raise CommandError("--nts is NTPv4 client mode only (no --symmetric, "
                           "--ntp-version 4)", USAGE_STATUS)
    if args.nts_port is not None and not 0 < args.nts_port < 65536:
        raise CommandError("--nts-port must be 1-65535", USAGE_STATUS)
    if args.nts_ca:
        try:
            ke_client.client_context(Path(args.nts_ca))
        except SSL.Error:
            raise CommandError(f"--nts-ca {args.nts_ca}: no CA certificate could be read "
                               "(a PEM file is expected)", USAGE_STATUS) from None


def nts_outcome(args: argparse.Namespace, host: str, port: int,
                ) -> tuple[dict[str, object], str | None]:
    """NTS-KE with ``host``, then ``--samples`` NTS exchanges with the NTP server it
    names: (the JSON report, the one-line error or None when ok)."""
    _, ke_client, NtsSession = nts_modules()
    server = args.server
    ke_port = NTS_KE_PORT if args.nts_port is None else args.nts_port
    ke_server = f"[{host}]:{ke_port}" if ":" in host else f"{host}:{ke_port}"
    try:
        session = ke_client.key_exchange(host, ke_port, host,
                                         Path(args.nts_ca) if args.nts_ca else None,
                                         timeout_s=args.timeout)
    except ke_client.KeClientError as error:
        kind = {"timeout": "no_reply", "resolve": "resolve_error"}.get(error.kind,
                                                                       "nts_ke_failed")
        line = f"{server}: {error}"
        return _failure(server, kind, line, client.NO_STRAYS,
                        nts={"ke_server": ke_server, "ke_failure": error.kind}), line
    ntp_host = session.ntp_server or host
    ntp_port = session.ntp_port or port
    ntp_server = f"[{ntp_host}]:{ntp_port}" if ":" in ntp_host else f"{ntp_host}:{ntp_port}"
    cookies = NtsSession(session.c2s, session.s2c, list(session.cookies))

    def once() -> client.Sample | None:
        request = cookies.request(secrets.randbits(64))
        if request is None:
            return None
        return client.exchange_request(ntp_host, ntp_port, request, args.timeout)

    nts: dict[str, object] = {
        "ke_server": ke_server, "ntp_server": ntp_server,
        "aead": AEAD_NAMES.get(session.algorithm, str(session.algorithm)),
        "cookies_from_ke": len(session.cookies)}
    report, message = _sampled(
        args, ntp_host, lambda: client.take_samples(once, args.samples,
                                                    client.SAMPLE_SPACING_S),
        "nts", {"nts": nts},
        nak_hint=f"NTS NAK: the NTP server {ntp_server} did not accept the cookies from "
                 f"NTS-KE {ke_server}")
    nts["cookies_from_replies"] = cookies.cookies_from_replies
    return report, message


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
    nts = report.get("nts")
    if report.get("authenticated") == "nts" and isinstance(nts, dict):
        lines.append(f"NTS-authenticated: NTS-KE {nts['ke_server']} ({nts['aead']}), "
                     f"NTP server {nts['ntp_server']}, cookies received: "
                     f"{nts['cookies_from_ke']} from NTS-KE, {nts['cookies_from_replies']} "
                     "in replies")
    ignored = report.get("ignored")
    if isinstance(ignored, dict) and ignored:
        lines.append(client.ExchangeStats(**ignored).describe())
    if "clock_change" in report:
        lines.append(f"system clock {report['clock_change']}")
    print("\n".join(lines), file=out)
