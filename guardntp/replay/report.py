"""What a replay found, per scenario and class, as text, JSON and a PNG plot.

Rule: the results are plain dataclasses filled by ``inprocess`` and ``live``; this
module only adds them up, checks them against the replay targets (``docs/replay.md``) and renders
them. matplotlib is imported only when a plot is drawn.

Units: bytes are NTP bytes (UDP payloads), in and out, so "out / in" is the
amplification factor; CPU is the server process's user + system time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .scenarios import ABUSIVE, LEGITIMATE

#: Legitimate classes get time for at least this share of their requests.
LEGITIMATE_TARGET = 0.99
VERDICTS = ("time", "kod", "drop")

# The yardstick for abusive classes is fixed and external: chrony's *default*
# ``ratelimit`` (chrony.conf: ``ratelimit [interval 3] [burst 8] [leak 2]``), never
# guardntp's own bucket settings. Per source address (chrony keys its client log on
# the whole address, IPv6 included), a source whose requests span ``t`` seconds may
# get ``min(requests, burst + t / 2^interval)`` answers; the rest is its *excess*.
#: chrony's default ``ratelimit interval 3``: one response per 2^3 = 8 s.
CHRONY_INTERVAL_S = 8
#: chrony's default ``ratelimit burst 8``.
CHRONY_BURST = 8
#: chrony's default ``ratelimit leak 2``: 1 in 2^2 limited requests answered anyway.
CHRONY_LEAK = 2
#: Issue 15's target: every abusive class gets >= 95 % of its excess suppressed.
ABUSIVE_TARGET = 0.95
#: The floor: suppress at least what chrony's default ``ratelimit`` itself does once a
#: source is over its allowance (its leak answers 1 in 4), i.e. 75 % of the excess.
CHRONY_FLOOR = 1 - 1 / 2 ** CHRONY_LEAK
ABUSIVE_TARGET_NAME = f"abusive: >= {ABUSIVE_TARGET:.0%} of excess over chrony's default " \
    "ratelimit suppressed"
CHRONY_FLOOR_NAME = f"abusive: >= {CHRONY_FLOOR:.0%} of excess suppressed (chrony's " \
    "default ratelimit floor)"
#: Targets the default filter is *known* to miss today (issue 15 open; measured on the
#: standard corpus, seed 1, 600 s: netgear-2003 85.2 %, mobatime-2009 69.5 % of excess
#: suppressed). Reported as met or missed like every other, labelled ASPIRATIONAL, and
#: left out of ``--check`` unless ``--strict``. A fixed list, never computed from a
#: run: a scenario not listed (a new one included) is held to every target. Remove an
#: entry once the filter meets it.
ASPIRATIONAL: frozenset[tuple[str, str]] = frozenset({
    (ABUSIVE_TARGET_NAME, "netgear-2003"),
    (ABUSIVE_TARGET_NAME, "mobatime-2009"),
    (CHRONY_FLOOR_NAME, "mobatime-2009"),
})


@dataclass
class GroupResult:
    """One (scenario, class): what its requests got."""

    scenario: str
    klass: str
    requests: int = 0
    time: int = 0
    kod: int = 0
    drop: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sources: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    #: Abusive classes: requests beyond chrony's default allowance, summed per source
    #: (``excess``), and how many of those got time anyway (``excess_served``): see
    #: :func:`score_excess`. ``None`` where not scored.
    excess: int | None = None
    excess_served: int | None = None

    @property
    def time_share(self) -> float:
        return self.time / self.requests if self.requests else 1.0

    @property
    def out_per_in(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0

    @property
    def excess_suppressed(self) -> int | None:
        if self.excess is None or self.excess_served is None:
            return None
        return self.excess - self.excess_served

    @property
    def suppressed_share(self) -> float | None:
        """Share of the excess not answered with time; ``None`` without excess."""
        suppressed = self.excess_suppressed
        if suppressed is None or not self.excess:
            return None
        return suppressed / self.excess


@dataclass
class RunResult:
    """One replay of a capture against one server."""

    name: str                      # "in-process guardntp", "live chronyd", ...
    mode: str                      # "in-process" or "live"
    server: str                    # "guardntp" or "chronyd"
    groups: list[GroupResult]
    #: Per second of the replay, f"{class}_{verdict}" -> counts (time, kod, drop).
    timeline: dict[str, list[int]] = field(default_factory=dict)
    replay_s: float = 0.0          # capture seconds (in-process) or wall seconds (live)
    wall_s: float = 0.0
    #: What was scored: the first ``window_packets`` packets of the capture, spanning
    #: ``window_s`` capture-seconds from its first packet. Every run of one report is
    #: scored over the same packets.
    window_packets: int = 0
    window_s: float = 0.0
    cpu_s: float | None = None     # server CPU (live)
    delivered: int | None = None   # requests that reached the server's host (live)
    tables: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def total(self, klass: str | None = None) -> GroupResult:
        total = GroupResult("total", klass or "all")
        for group in self.groups:
            if klass is None or group.klass == klass:
                for name in ("requests", "time", "kod", "drop", "bytes_in", "bytes_out",
                             "sources"):
                    setattr(total, name, getattr(total, name) + getattr(group, name))
        return total

    @property
    def cpu_per_request_us(self) -> float | None:
        if self.cpu_s is None or not self.delivered:
            return None
        return self.cpu_s / self.delivered * 1e6


@dataclass
class Target:
    run: str
    name: str
    subject: str
    ok: bool
    detail: str
    #: "required" (``--check`` fails on a miss), "aspirational" (a known miss today,
    #: listed in ``ASPIRATIONAL``: fails only ``--check --strict``) or "reference" (the
    #: chronyd comparison run: scored the same way, never enforced).
    kind: str = "required"


@dataclass
class Report:
    capture: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every required target met (what ``--check`` enforces)."""
        return all(target.ok for target in self.targets if target.kind == "required")

    @property
    def strictly_ok(self) -> bool:
        """Every target met, aspirational ones included (``--check --strict``)."""
        return all(target.ok for target in self.targets if target.kind != "reference")


# ---------------------------------------------------------------------- yardstick

def chrony_allowance(requests: int, span_ns: int) -> int:
    """Answers chrony's default ``ratelimit`` allows one source: ``burst 8`` plus one per
    8 s of the span from its first to its last request, at most its requests."""
    return min(requests, CHRONY_BURST + span_ns // (CHRONY_INTERVAL_S * 1_000_000_000))


def score_excess(sources: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
    """(excess, excess served) summed over sources given as (requests, span in ns,
    time replies). A source's excess is its requests beyond :func:`chrony_allowance`;
    of it, the time replies beyond the allowance were served. Counted per source, so
    one source's unused allowance never covers another's answers."""
    excess = served = 0
    for requests, span_ns, answered in sources:
        allowed = chrony_allowance(requests, span_ns)
        excess += requests - allowed
        served += max(0, min(answered, requests) - allowed)
    return excess, served


# ---------------------------------------------------------------------- targets

def evaluate(report: Report) -> None:
    """Fill ``report.targets`` from its runs (the replay targets, ``docs/replay.md``)."""
    targets: list[Target] = []
    for run in report.runs:
        first = len(targets)
        for group in run.groups:
            subject = f"{group.scenario} ({group.klass})"
            if group.klass == LEGITIMATE and group.requests:
                targets.append(Target(
                    run.name, "legitimate requests get time", subject,
                    group.time_share >= LEGITIMATE_TARGET,
                    f"{group.time_share:.2%} of {group.requests} (target >= "
                    f"{LEGITIMATE_TARGET:.0%})"))
            if group.klass == ABUSIVE:
                targets += _abusive_targets(run.name, group, subject)
            if group.requests:
                targets.append(Target(
                    run.name, "bytes out <= bytes in", subject,
                    group.bytes_out <= group.bytes_in,
                    f"{group.bytes_out} B out / {group.bytes_in} B in = {group.out_per_in:.3f}"))
        if "max_sources" in run.tables:
            peak, cap = run.tables["peak_sources"], run.tables["max_sources"]
            targets.append(Target(run.name, "source table within its cap", "filter",
                                  peak <= cap, f"peak {peak} entries, cap {cap}"))
            peak, cap = run.tables["peak_prefixes"], run.tables["max_prefixes"]
            targets.append(Target(run.name, "prefix table within its cap", "filter",
                                  peak <= cap, f"peak {peak} entries, cap {cap}"))
        if run.server != "guardntp":
            for target in targets[first:]:
                target.kind = "reference"
    report.targets = targets


def _abusive_targets(run: str, group: GroupResult, subject: str) -> list[Target]:
    """The floor and issue 15's target for one abusive scenario. Unscored (no per-source
    counts, e.g. an unlabelled capture) is a miss, never a pass."""
    out = []
    for name, wanted in ((CHRONY_FLOOR_NAME, CHRONY_FLOOR), (ABUSIVE_TARGET_NAME, ABUSIVE_TARGET)):
        share = group.suppressed_share
        if group.excess is None or group.excess_served is None:
            ok, detail = False, "not scored (no per-source counts)"
        elif not group.excess:
            ok, detail = True, (f"no excess: all {group.requests} requests within chrony's "
                                "default allowance")
        else:
            assert share is not None
            ok = share >= wanted
            detail = (f"{share:.1%} of {group.excess} excess suppressed, "
                      f"{group.excess_served} served (target >= {wanted:.0%})")
        out.append(Target(run, name, subject, ok, detail,
                          "aspirational" if (name, group.scenario) in ASPIRATIONAL
                          else "required"))
    return out


# ---------------------------------------------------------------------- rendering

def _row(name: str, klass: str, group: GroupResult) -> str:
    share = f"{group.time_share:>7.1%}" if group.requests else f"{'-':>7}"
    ratio = f"{group.out_per_in:>7.3f}" if group.bytes_in else f"{'-':>7}"
    excess = f"{group.excess:>9}" if group.excess is not None else f"{'-':>9}"
    suppressed = group.suppressed_share
    supp = f"{suppressed:>7.1%}" if suppressed is not None else f"{'-':>7}"
    return (f"{name:<18} {klass:<10} {group.requests:>9} {group.time:>9} {group.kod:>7} "
            f"{group.drop:>9} {share} {ratio} {excess} {supp}")


def _sum_excess(groups: list[GroupResult]) -> tuple[int | None, int | None]:
    scored = [g for g in groups if g.excess is not None and g.excess_served is not None]
    if not scored:
        return None, None
    return sum(g.excess or 0 for g in scored), sum(g.excess_served or 0 for g in scored)


def render_text(report: Report) -> str:
    capture = report.capture
    lines = [f"capture {capture.get('path', '?')}: {capture.get('packets', '?')} packets, "
             f"{capture.get('duration_s', '?')} s, seed {capture.get('seed', '?')}, "
             f"scale {capture.get('scale', '?')}"]
    for run in report.runs:
        lines += ["", f"== {run.name} ==",
                  "  ".join(f"{k} {v}" for k, v in run.settings.items()) or "(defaults)"]
        header = (f"{'scenario':<18} {'class':<10} {'requests':>9} {'time':>9} {'kod':>7} "
                  f"{'drop':>9} {'time%':>7} {'out/in':>7} {'excess':>9} {'supp%':>7}")
        lines += [header, "-" * len(header)]
        for group in run.groups:
            lines.append(_row(group.scenario, group.klass, group))
        lines.append("-" * len(header))
        for klass in (LEGITIMATE, ABUSIVE):
            if any(g.klass == klass for g in run.groups):
                total = run.total(klass)
                total.excess, total.excess_served = _sum_excess(
                    [g for g in run.groups if g.klass == klass])
                lines.append(_row("total", klass, total))
        lines.append(_row("total", "all", run.total()))
        lines.append(f"scored: the first {run.window_packets} packets of the capture, "
                     f"{run.window_s:.1f} capture-s")
        speed = run.total().requests / run.wall_s if run.wall_s else 0.0
        if run.mode == "in-process":
            lines.append(f"replayed {run.replay_s:.1f} capture-s of traffic in "
                         f"{run.wall_s:.1f} s wall ({speed:,.0f} packets/s)")
        else:
            lines.append(f"sent for {run.wall_s:.1f} s wall ({speed:,.0f} packets/s)")
        if run.delivered is not None:
            lines.append(f"reached the server's host: {run.delivered} requests")
        if run.cpu_per_request_us is not None:
            lines.append(f"server CPU: {run.cpu_s:.2f} s, {run.cpu_per_request_us:.1f} us "
                         "per request")
        if run.tables:
            lines.append("tables: " + ", ".join(f"{k} {v}" for k, v in run.tables.items()))
        drops: dict[str, int] = {}
        for group in run.groups:
            for reason, count in group.reasons.items():
                if reason not in ("answered", "leaked"):
                    drops[reason] = drops.get(reason, 0) + count
        if drops:
            lines.append("not answered with time, by reason: " + ", ".join(
                f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])))
        lines += [f"note: {note}" for note in run.notes]
    if report.targets:
        lines += ["", "excess: requests beyond chrony's default ratelimit allowance (burst "
                  f"{CHRONY_BURST} + 1 per {CHRONY_INTERVAL_S} s of each source's span), per "
                  "source address; supp%: share of it not answered with time"]
        counts = []
        for kind in ("required", "aspirational", "reference"):
            of_kind = [t for t in report.targets if t.kind == kind]
            if of_kind:
                counts.append(f"{kind} {sum(t.ok for t in of_kind)} of {len(of_kind)} met")
        lines.append("== targets: " + "; ".join(counts) + " ==")
        for target in report.targets:
            tag = "" if target.kind == "required" else f" ({target.kind.upper()})"
            lines.append(f"{'met   ' if target.ok else 'MISSED'}{tag} [{target.run}] "
                         f"{target.name}: {target.subject}: {target.detail}")
        lines.append("--check: " + ("every required target met" if report.ok else
                                    "a required target is missed (exit status 1)"))
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    for run_data, run in zip(data["runs"], report.runs, strict=True):
        run_data["cpu_per_request_us"] = run.cpu_per_request_us
        for group_data, group in zip(run_data["groups"], run.groups, strict=True):
            group_data["time_share"] = group.time_share
            group_data["out_per_in"] = group.out_per_in
            group_data["suppressed_share"] = group.suppressed_share
        run_data["totals"] = {klass: asdict(run.total(klass if klass != "all" else None))
                              for klass in (LEGITIMATE, ABUSIVE, "all")}
    data["ok"] = report.ok
    data["strictly_ok"] = report.strictly_ok
    data["yardstick"] = {"ratelimit": "chrony default", "interval_s": CHRONY_INTERVAL_S,
                         "burst": CHRONY_BURST, "leak": CHRONY_LEAK,
                         "abusive_target": ABUSIVE_TARGET, "floor": CHRONY_FLOOR,
                         "legitimate_target": LEGITIMATE_TARGET}
    return data


def render_plot(report: Report, path: Path) -> None:
    """Answered and unanswered requests per second for each run, and the share of
    each scenario's requests that got time, run beside run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report.runs
    fig, axes = plt.subplots(len(runs) + 1, 1, figsize=(11, 3.2 * (len(runs) + 1)),
                             squeeze=False)
    styles = {(LEGITIMATE, "time"): ("tab:green", "-"), (LEGITIMATE, "drop"): ("tab:red", "-"),
              (ABUSIVE, "time"): ("tab:olive", "--"), (ABUSIVE, "drop"): ("tab:gray", "--"),
              (ABUSIVE, "kod"): ("tab:purple", ":"), (LEGITIMATE, "kod"): ("tab:orange", ":")}
    for axis, run in zip(axes[:, 0], runs, strict=False):
        for (klass, verdict), (colour, line) in styles.items():
            series = run.timeline.get(f"{klass}_{verdict}")
            if series and any(series):
                label = {"time": "answered (time)", "kod": "KoD",
                         "drop": "not answered"}[verdict]
                axis.plot(range(len(series)), series, line, color=colour, linewidth=1,
                          label=f"{klass} {label}")
        axis.set_title(run.name)
        axis.set_ylabel("requests / s")
        axis.set_xlabel("capture seconds" if run.mode == "in-process" else "wall seconds")
        axis.set_yscale("symlog", linthresh=10)
        axis.legend(fontsize=7, loc="upper right")
        axis.grid(alpha=0.3)
    bars = axes[-1, 0]
    names = [g.scenario for g in runs[0].groups] if runs else []
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        shares = {g.scenario: g.time_share * 100 for g in run.groups if g.requests}
        bars.bar([i + index * width for i in range(len(names))],
                 [shares.get(name, 0.0) for name in names], width, label=run.name)
    bars.axhline(LEGITIMATE_TARGET * 100, color="tab:green", linewidth=0.8, linestyle=":")
    bars.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(names))])
    klass_of = {g.scenario: g.klass for g in runs[0].groups} if runs else {}
    bars.set_xticklabels([f"{n}\n({klass_of[n]})" for n in names], fontsize=7)
    bars.set_ylabel("% of requests answered with time")
    bars.set_ylim(0, 105)
    bars.legend(fontsize=7)
    bars.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, directory: Path, plot: bool = True) -> list[Path]:
    """report.txt, report.json and (if ``plot``) report.png in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "report.txt", directory / "report.json"]
    paths[0].write_text(render_text(report))
    paths[1].write_text(json.dumps(to_json(report), indent=1) + "\n")
    if plot:
        paths.append(directory / "report.png")
        render_plot(report, paths[2])
    return paths
