"""Replay a capture through the real ``Pipeline`` and ``Responder`` with virtual time.

Rule: deterministic, and the shipped code: where the compiled loop is built, each
datagram goes through its decision (``FastLane.decide_one``, which hands what it
does not take to ``Pipeline.decide`` exactly as the server's loop does), else
through ``Pipeline.decide``; the report says which. Each UDP datagram to port
123 is decided at its capture timestamp (used as both the wall-clock receive time
and the monotonic ``now``), the clock snapshot is refreshed every 0.25
capture-seconds as the server does, and the leak's random generator is seeded.
Nothing is sent anywhere.

Abusive scenarios are scored per source address against chrony's default
``ratelimit`` (``report.score_excess``): what each source sent and got is counted
here, per packet, whatever the filter's own settings are.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import fastlane
from ..filter.pipeline import Pipeline
from ..filter.policy import FilterPolicy
from ..responder import Responder
from ..server import CLOCK_REFRESH_S
from ..timesources.local import LocalClock
from ..timestamps import NS_PER_S
from ..verdicts import N_REASONS, VERDICT_OF, Reason
from .pcap import PcapError, parse_udp, read_frames
from .report import VERDICTS, GroupResult, RunResult, score_excess
from .scenarios import ABUSIVE, SERVER_PORT
from .sidecar import UNLABELLED, Labels

#: progress(packets done, capture ns since the first packet)
Progress = Callable[[int, int], None]
PROGRESS_EVERY = 1 << 14
_VERDICT_INDEX = [VERDICTS.index(VERDICT_OF[Reason(r)].value) for r in range(N_REASONS)]
_TIME = VERDICTS.index("time")


def replay_in_process(capture: Path, policy: FilterPolicy, labels: Labels | None,
                      settings: dict[str, object] | None = None,
                      progress: Progress | None = None,
                      max_packets: int | None = None) -> RunResult:
    """Decide every request in ``capture`` (or in its first ``max_packets`` packets, the
    window a live replay sends); raises PcapError for unreadable captures."""
    # The compiled decision needs a socket only to exist: this one is never bound.
    sock = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if fastlane.available()
            else None)
    try:
        return _replay(capture, policy, labels, settings, progress, max_packets, sock)
    finally:
        if sock is not None:
            sock.close()


def _replay(capture: Path, policy: FilterPolicy, labels: Labels | None,
            settings: dict[str, object] | None, progress: Progress | None,
            max_packets: int | None, sock: socket.socket | None) -> RunResult:
    if policy.random_seed is None:
        policy = replace(policy, random_seed=0)
    if labels is None:
        labels = Labels(groups=[UNLABELLED])
        group_of_packet = None
    else:
        group_of_packet = labels.group_of_packet
    groups = labels.groups
    n_groups = len(groups)
    reason_counts = [0] * (n_groups * N_REASONS)
    bytes_in = [0] * n_groups
    bytes_out = [0] * n_groups
    sources_seen: list[set[bytes]] = [set() for _ in groups]
    # Per abusive group: source address (whole, as chrony keys it) -> [requests, first
    # ns, last ns, time replies]: the yardstick's input, independent of the policy.
    tracked: list[dict[bytes, list[int]] | None] = [
        {} if klass == ABUSIVE else None for _, klass in groups]
    # Per group and verdict, requests per capture-second: group * 3 + verdict.
    timeline: list[list[int]] = [[] for _ in range(n_groups * len(VERDICTS))]

    clock = LocalClock()
    responder: Responder | None = None
    pipeline: Pipeline | None = None
    decide: Callable[..., tuple[Any, ...]] | None = None
    lane: fastlane.FastLane | None = None
    first_ns = last_ns = next_refresh = 0
    frames = 0
    second_end = 0
    second = -1
    peak_sources = peak_prefixes = 0
    ignored = 0
    packets = 0
    started = time.monotonic()
    for index, (t_ns, frame) in enumerate(read_frames(str(capture))):
        if max_packets is not None and index >= max_packets:
            break
        frames = index + 1
        if group_of_packet is None:
            group = 0
        elif index < len(group_of_packet):
            group = group_of_packet[index]
        else:
            raise PcapError(f"{capture}: more packets than its labels file has lines")
        datagram = parse_udp(frame)
        if datagram is None or datagram[3] != SERVER_PORT:
            ignored += 1
            continue
        if pipeline is None:
            responder = Responder(clock.state(t_ns), t_ns)
            pipeline = Pipeline(policy, responder)
            if sock is not None:
                lane = fastlane.FastLane(sock, pipeline)
                decide = lane.decide_one
            else:
                decide = pipeline.decide
            first_ns = second_end = next_refresh = t_ns
        assert responder is not None and decide is not None
        if t_ns >= next_refresh:
            responder.set_clock(clock.state(t_ns), t_ns)
            next_refresh = t_ns + int(CLOCK_REFRESH_S * NS_PER_S)
        if t_ns >= second_end:
            # Sample the tables once a capture-second (they only grow between samples
            # by what one second brings, and they never exceed their caps by construction).
            peak_sources = max(peak_sources, len(pipeline.sources))
            peak_prefixes = max(peak_prefixes, len(pipeline.prefixes))
            second = (t_ns - first_ns) // NS_PER_S
            second_end = first_ns + (second + 1) * NS_PER_S
            for series in timeline:
                series.extend([0] * (second + 1 - len(series)))
        src, port, _, _, data, ttl = datagram
        reason, reply = decide(data, src, port, t_ns, t_ns, ttl)[:2]
        reason_counts[group * N_REASONS + reason] += 1
        bytes_in[group] += len(data)
        if reply is not None:
            bytes_out[group] += len(reply)
        verdict = _VERDICT_INDEX[reason]
        timeline[group * 3 + verdict][second] += 1
        sources_seen[group].add(src)
        by_source = tracked[group]
        if by_source is not None:
            answered = verdict == _TIME
            record = by_source.get(src)
            if record is None:
                by_source[src] = [1, t_ns, t_ns, answered]
            else:
                record[0] += 1
                record[2] = t_ns
                record[3] += answered
        last_ns = t_ns
        packets += 1
        if progress and not packets % PROGRESS_EVERY:
            progress(packets, t_ns - first_ns)
    if group_of_packet is not None and max_packets is None \
            and ignored + packets != len(group_of_packet):
        raise PcapError(f"{capture}: fewer packets than its labels file has lines")
    wall_s = time.monotonic() - started
    if progress:
        progress(packets, (second + 1) * NS_PER_S)

    results = []
    for group, (scenario, klass) in enumerate(groups):
        counts = reason_counts[group * N_REASONS:(group + 1) * N_REASONS]
        result = GroupResult(scenario, klass, sources=len(sources_seen[group]),
                             bytes_in=bytes_in[group], bytes_out=bytes_out[group],
                             reasons={Reason(r).name.lower(): c for r, c in enumerate(counts)
                                      if c})
        for reason_index, count in enumerate(counts):
            name = VERDICTS[_VERDICT_INDEX[reason_index]]
            setattr(result, name, getattr(result, name) + count)
        result.requests = sum(counts)
        by_source = tracked[group]
        if by_source is not None:
            result.excess, result.excess_served = score_excess(
                (r[0], r[2] - r[1], r[3]) for r in by_source.values())
        results.append(result)

    run = RunResult("in-process guardntp", "in-process", "guardntp", results,
                    replay_s=float(second + 1), wall_s=wall_s, settings=dict(settings or {}),
                    window_packets=frames, window_s=(last_ns - first_ns) / NS_PER_S)
    for group, (scenario, _) in enumerate(groups):  # summed if two groups share a name
        by_verdict = run.timeline.setdefault(scenario, {})
        for v, name in enumerate(VERDICTS):
            counts = timeline[group * 3 + v]
            before = by_verdict.get(name, [0] * len(counts))
            by_verdict[name] = [a + b for a, b in zip(before, counts, strict=True)]
    if pipeline is not None:
        peak_sources = max(peak_sources, len(pipeline.sources))
        peak_prefixes = max(peak_prefixes, len(pipeline.prefixes))
        run.tables = {"peak_sources": peak_sources, "max_sources": policy.max_sources,
                      "peak_prefixes": peak_prefixes, "max_prefixes": policy.max_prefixes,
                      "source_evictions": pipeline.sources.evictions,
                      "newcomers_at_end": len(pipeline.newcomers),
                      "max_newcomers": policy.max_newcomers,
                      "promotions_refused": pipeline.table_full}
    if ignored:
        run.notes.append(f"{ignored} packets were not UDP to port {SERVER_PORT} and were skipped")
    if lane is not None:
        run.notes.append(f"decided by the compiled loop's decision (FastLane.decide_one): "
                         f"{lane.fast_decisions} time replies and {lane.first_sightings} "
                         f"first sightings in C, the rest as the server hands them over")
    elif packets:
        run.notes.append("decided by Pipeline.decide: the compiled loop is not built here")
    return run
