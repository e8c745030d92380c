"""``--clock upstream`` against hostile and honest servers on loopback.

The hostile ones are scripted responders on 127.0.0.x (offset, stratum, root
distance, Kiss-o'-Death and leap as the test says); the honest ones are
scripted too, or real chronyd serving its local clock. Traffic goes only to
127.0.0.0/8; every loop is bounded in count and time.
"""

from __future__ import annotations

import calendar
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import chronyd_running, free_udp_port, needs_chronyd, wait_until_answering

from guardntp.timesources.selection import FALSETICKER, SELECTED, UNUSABLE
from guardntp.timesources.upstream import Upstream, UpstreamClock
from guardntp.timestamps import NS_PER_S, ns_to_short, unix_ns_to_ntp
from guardntp.wire import Leap, Mode, NtpPacket, encode, parse

MS = 1_000_000
#: Every scripted responder dies after this long, whatever the test does.
RESPONDER_LIFETIME_S = 60.0


@dataclass
class Script:
    """What a scripted server answers; tests change it while it runs."""

    offset_ns: int = 0
    stratum: int = 2
    root_delay_ns: int = 2 * MS
    root_dispersion_ns: int = 1 * MS
    kiss_code: str = ""
    kod_poll: int = 0
    leap: Leap = Leap.NONE
    #: offset_ns and leap as functions of our (possibly fake) time, when set.
    timeline: Callable[[int], tuple[int, Leap]] | None = None


class ScriptedServer:
    """A tiny NTP server on 127.0.0.x in a thread, answering as its :class:`Script` says."""

    def __init__(self, host: str, script: Script | None = None,
                 clock_ns: Callable[[], int] = time.time_ns, port: int = 0) -> None:
        self.script = script or Script()
        self.clock_ns = clock_ns
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def upstream(self) -> Upstream:
        return Upstream(self.host, self.port)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        deadline = time.monotonic() + RESPONDER_LIFETIME_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            now = self.clock_ns()
            self.requests += 1
            try:
                request = parse(data)
            except ValueError:
                continue
            self.sock.sendto(self._reply(request, now), peer)

    def _reply(self, request: NtpPacket, now_ns: int) -> bytes:
        script = self.script
        if script.kiss_code:
            return encode(NtpPacket(
                leap=Leap.UNSYNCHRONIZED, version=4, mode=Mode.SERVER, stratum=0,
                poll=script.kod_poll, refid=script.kiss_code.encode().ljust(4, b"\0"),
                origin_ts=request.transmit_ts, receive_ts=request.transmit_ts,
                transmit_ts=request.transmit_ts))
        offset_ns, leap = script.timeline(now_ns) if script.timeline else \
            (script.offset_ns, script.leap)
        served = unix_ns_to_ntp(now_ns + offset_ns)
        return encode(NtpPacket(
            leap=leap, version=4, mode=Mode.SERVER, stratum=script.stratum, poll=request.poll,
            precision=-24, root_delay=ns_to_short(script.root_delay_ns),
            root_dispersion=ns_to_short(script.root_dispersion_ns), refid=b"GPS\0",
            reference_ts=served, origin_ts=request.transmit_ts, receive_ts=served,
            transmit_ts=served))

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@contextlib.contextmanager
def scripted(*scripts: Script, first_host: int = 2, clock_ns: Callable[[], int] = time.time_ns,
             port: int = 0) -> Iterator[list[ScriptedServer]]:
    """One scripted server per script on 127.0.0.<first_host>, .<first_host + 1>, ..."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ScriptedServer(f"127.0.0.{first_host + index}", script,
                                                  clock_ns, port))
               for index, script in enumerate(scripts)]


def liar(offset_ns: int) -> Script:
    """Stratum 1 with zero root delay and dispersion: the most attractive claim there is."""
    return Script(offset_ns=offset_ns, stratum=1, root_delay_ns=0, root_dispersion_ns=0)


def quick_clock(upstreams: list[Upstream], **options: object) -> UpstreamClock:
    settings: dict[str, object] = dict(poll_s=0.2, sample_spacing_s=0.05, timeout_s=0.3)
    settings.update(options)
    return UpstreamClock(upstreams, **settings)  # type: ignore[arg-type]


def poll_rounds(clock: UpstreamClock, rounds: int, budget_s: float = 10.0) -> None:
    """Run ``rounds`` poll rounds (bounded in time too), waiting for sources to be due."""
    deadline = time.monotonic() + budget_s
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        clock.poll_once()
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def statuses(clock: UpstreamClock) -> dict[str, str]:
    return {str(row["source"]): str(row["status"]) for row in clock.selection_report()}


def served_offset_ms(clock: UpstreamClock) -> float:
    return clock.state(time.time_ns()).offset_ns / MS


# ------------------------------------------------------------------------- scenarios

@needs_chronyd
def test_one_falseticker_among_two_real_chronyds_is_rejected(tmp_path: Path) -> None:
    ports = [free_udp_port(), free_udp_port()]
    with contextlib.ExitStack() as stack:
        for index, port in enumerate(ports):
            stack.enter_context(chronyd_running(
                tmp_path / f"chrony{index}", f"port {port}\nbindaddress 127.0.0.1\n"
                "allow 127.0.0.0/8\nlocal stratum 2\ncmdport 0"))
        for port in ports:
            wait_until_answering(port)
        with scripted(liar(2 * NS_PER_S)) as (bad,):
            clock = quick_clock([Upstream("127.0.0.1", ports[0]), Upstream("127.0.0.1", ports[1]),
                                 bad.upstream])
            poll_rounds(clock, 4)
            state = clock.state(time.time_ns())
            report = statuses(clock)
            print(f"served offset {state.offset_ns / MS:+.3f} ms, report {report}")
            assert report[bad.name] == FALSETICKER
            assert [report[f"127.0.0.1:{port}"] for port in ports] == [SELECTED, SELECTED]
            assert state.synchronized and state.stratum == 3
            assert state.refid == bytes([127, 0, 0, 1])
            assert abs(state.offset_ns) < 1 * MS   # chronyd serves this machine's clock


def test_one_falseticker_among_three_scripted() -> None:
    with scripted(Script(), Script(offset_ns=300_000), Script(offset_ns=-200_000),
                  liar(2 * NS_PER_S)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 3)
        report = statuses(clock)
        offset = served_offset_ms(clock)
        print(f"served offset {offset:+.3f} ms, honest 0 / +0.3 / -0.2 ms")
        assert report[servers[3].name] == FALSETICKER
        assert abs(offset - 0.033) < 1.0 and clock.state(time.time_ns()).synchronized


def test_two_falsetickers_among_five() -> None:
    with scripted(Script(), Script(offset_ns=200_000), Script(offset_ns=-100_000),
                  liar(2 * NS_PER_S), liar(-3 * NS_PER_S)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 3)
        report = statuses(clock)
        offset = served_offset_ms(clock)
        print(f"served offset {offset:+.3f} ms, report {report}")
        assert report[servers[3].name] == FALSETICKER and report[servers[4].name] == FALSETICKER
        assert abs(offset) < 1.0
        summary = clock.selection_summary()
        assert summary["sources"] == {"selected": 3, "falseticker": 2, "outlier": 0,
                                      "unusable": 0}
        assert summary["pending_jump_s"] is None


def test_two_disagreeing_upstreams_serve_li3() -> None:
    with scripted(Script(), Script(offset_ns=2 * NS_PER_S)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        state = clock.state(time.time_ns())
        print(f"state: {state.wire_leap.name}, {state.detail}")
        assert not state.synchronized and state.wire_leap is Leap.UNSYNCHRONIZED
        assert set(statuses(clock).values()) == {FALSETICKER}


def test_deny_kod_removes_the_source() -> None:
    with scripted(Script(), Script(), Script(kiss_code="DENY")) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        asked = servers[2].requests
        poll_rounds(clock, 3)
        row = next(r for r in clock.selection_report() if r["source"] == servers[2].name)
        assert row["status"] == UNUSABLE and "Kiss-o'-Death DENY" in str(row["reason"])
        print(f"DENY: served offset {served_offset_ms(clock):+.3f} ms, {row['reason']}")
        assert asked == 1 and servers[2].requests == 1   # never asked again
        assert servers[2].name not in [source.name for source in clock.sources]
        assert clock.state(time.time_ns()).synchronized


def test_rate_kod_raises_the_poll() -> None:
    with scripted(Script(), Script(kiss_code="RATE", kod_poll=6)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 3)
        limited = next(s for s in clock.sources if s.name == servers[1].name)
        assert limited.poll_s >= 64  # the KoD's poll 6 = 64 s, and at least double
        assert servers[1].requests == 1
        row = next(r for r in clock.selection_report() if r["source"] == servers[1].name)
        assert "RATE" in str(row["last_error"])


def test_sixteen_seconds_of_root_dispersion_is_refused() -> None:
    with scripted(Script(), Script(root_dispersion_ns=16 * NS_PER_S)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        report = statuses(clock)
        print(f"16 s dispersion: served offset {served_offset_ms(clock):+.3f} ms, {report}")
        assert report[servers[1].name] == UNUSABLE
        assert clock.keeper.system_peer == servers[0].name
    with scripted(Script(root_dispersion_ns=16 * NS_PER_S), first_host=9) as servers:
        alone = quick_clock([server.upstream for server in servers])
        poll_rounds(alone, 2)
        assert not alone.state(time.time_ns()).synchronized


def test_plus_1000_s_is_refused() -> None:
    with scripted(Script(), Script(), liar(1000 * NS_PER_S)) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        print(f"+1000 s liar: served offset {served_offset_ms(clock):+.3f} ms")
        assert statuses(clock)[servers[2].name] == FALSETICKER
        assert abs(served_offset_ms(clock)) < 1.0
    # Even when every upstream says so: beyond the panic threshold, not without the operator.
    with scripted(Script(offset_ns=1000 * NS_PER_S), Script(offset_ns=1000 * NS_PER_S),
                  first_host=12) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        state = clock.state(time.time_ns())
        print(f"+1000 s from all: LI {state.wire_leap.name}, {state.detail}")
        assert not state.synchronized and "panic threshold" in state.detail


def test_a_pool_uses_max_sources_and_replaces_an_unreachable_member() -> None:
    port = free_udp_port("127.0.0.20")   # one port for every member, as a pool name has
    with scripted(Script(), Script(), Script(), Script(), first_host=20, port=port) as servers:
        dead = "127.0.0.30"   # nothing listens there
        addresses = [dead, *(server.host for server in servers)]
        asked: list[str] = []

        def resolver(host: str, resolve_port: int) -> list[str]:
            asked.append(host)
            return list(addresses)

        clock = quick_clock([Upstream("pool.test", port)], max_sources=4, resolver=resolver,
                            resolve_interval_s=0.2, replace_after_polls=2, timeout_s=0.1)
        clock.poll_once()
        assert [s.address for s in clock.sources] == addresses[:4]
        poll_rounds(clock, 5)
        in_use = [s.address for s in clock.sources]
        assert dead not in in_use and len(in_use) == 4 and servers[3].host in in_use
        assert asked and set(asked) == {"pool.test"}
        assert clock.state(time.time_ns()).synchronized


NEW_YEAR = calendar.timegm((2027, 1, 1, 0, 0, 0)) * NS_PER_S


def test_an_inserted_leap_second_is_served_at_the_right_instant() -> None:
    shift = NEW_YEAR - 4 * NS_PER_S - time.time_ns()

    def fake_now() -> int:  # a clock 4 s before the leap, running at the real rate
        return time.time_ns() + shift

    def timeline(now_ns: int) -> tuple[int, Leap]:
        return (0, Leap.INSERT_SECOND) if now_ns < NEW_YEAR else (-NS_PER_S, Leap.NONE)

    with scripted(*(Script(timeline=timeline) for _ in range(3)), first_host=40,
                  clock_ns=fake_now) as servers:
        clock = quick_clock([server.upstream for server in servers], poll_s=0.5,
                            clock_ns=fake_now)
        seen: list[tuple[int, int, Leap, bool]] = []
        deadline = time.monotonic() + 9.0
        while time.monotonic() < deadline and fake_now() < NEW_YEAR + 4 * NS_PER_S:
            clock.poll_once()
            for _ in range(5):
                now = fake_now()
                state = clock.state(now)
                seen.append((now, state.offset_ns, state.leap, state.synchronized))
                time.sleep(0.1)
    assert any(now < NEW_YEAR for now, *_ in seen) and any(now > NEW_YEAR for now, *_ in seen)
    for now, offset, leap, synchronized in seen:
        expected, _ = timeline(now)
        if abs(now - NEW_YEAR) < 50 * MS:
            continue   # the instant itself: either side is right
        assert synchronized
        assert abs(offset - expected) < 5 * MS, (now - NEW_YEAR, offset)
        assert leap is (Leap.INSERT_SECOND if now < NEW_YEAR else Leap.NONE)
    worst = max(abs(offset - timeline(now)[0]) for now, offset, *_ in seen
                if abs(now - NEW_YEAR) >= 50 * MS)
    print(f"leap: {len(seen)} readings, worst served error {worst / MS:.3f} ms")
    assert clock.keeper.pending is None


@pytest.mark.parametrize("code", ["RSTR"])
def test_rstr_kod_removes_the_source_too(code: str) -> None:
    with scripted(Script(), Script(kiss_code=code), first_host=50) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        assert servers[1].name not in [source.name for source in clock.sources]


def test_holdover_when_every_upstream_goes_silent_then_li3() -> None:
    with scripted(Script(), Script(), first_host=60) as servers:
        clock = quick_clock([server.upstream for server in servers], lost_after_s=2.0,
                            timeout_s=0.1)
        poll_rounds(clock, 2)
        synced = clock.state(time.time_ns())
        assert synced.synchronized
    # The responders are gone: the sources become unreachable (8 polls of 0.2 s),
    # the server holds over (the time it last tracked, frequency-corrected), then
    # gives up after lost_after.
    held = None
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        clock.poll_once()
        state = clock.state(time.time_ns())
        if "holdover" in state.detail:
            held = state
        if not state.synchronized:
            break
        time.sleep(0.2)
    assert held is not None and held.synchronized
    assert abs(held.offset_ns - synced.offset_ns) < 1 * MS
    assert not clock.state(time.time_ns()).synchronized
    assert {row["status"] for row in clock.selection_report()} == {UNUSABLE}


def test_a_step_of_the_system_clock_under_us_keeps_the_served_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with scripted(Script(), Script(), first_host=70) as servers:
        clock = quick_clock([server.upstream for server in servers])
        poll_rounds(clock, 2)
        before = clock.state(time.time_ns()).offset_ns
        base = clock._clock_base_ns
        # As if someone stepped CLOCK_REALTIME 5 s ahead (the kernel's leap second
        # would be -1 s): our served offset must absorb it.
        monkeypatch.setattr(UpstreamClock, "_realtime_minus_monotonic",
                            staticmethod(lambda: base + 5 * NS_PER_S))
        # The wall clock read after the step reads 5 s more too: without it, the
        # frequency estimate (hundreds of ppm after two quick polls on a busy machine)
        # would extrapolate over a step that never happened (5 s x 443 ppm = 2.2 ms).
        after = clock.state(time.time_ns() + 5 * NS_PER_S).offset_ns
        assert abs(after - (before - 5 * NS_PER_S)) < 1 * MS


def test_from_config_passes_the_clock_section() -> None:
    from guardntp.config import ClockConfig

    clock = UpstreamClock.from_config(ClockConfig(
        source="upstream", upstreams=("127.0.0.1:1123", "pool.test"), poll=16.0,
        max_sources=2, max_distance=1.5, stepout=900.0, allow_panic=True, iburst=False), -20)
    assert clock.upstreams == [Upstream("127.0.0.1", 1123), Upstream("pool.test", 123)]
    assert clock.max_sources == 2 and clock.iburst is False
    assert clock.keeper.settings.max_distance_ns == 1_500_000_000
    assert clock.keeper.settings.stepout_ns == 900 * NS_PER_S
    assert clock.keeper.settings.allow_panic
