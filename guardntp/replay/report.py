"""What a replay found, per scenario and class, as text, JSON and a PNG plot.

Rule: the results are plain dataclasses filled by ``inprocess`` and ``live``; this
module only adds them up, checks them against the targets of issue 4 and renders
them. matplotlib is imported only when a plot is drawn.

Units: bytes are NTP bytes (UDP payloads), in and out, so "out / in" is the
amplification factor; CPU is the server process's user + system time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .scenarios import ABUSIVE, LEGITIMATE

#: Issue 4: legitimate classes get time for at least this share of their requests.
LEGITIMATE_TARGET = 0.99
VERDICTS = ("time", "kod", "drop")


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
    #: Most time replies the filter may give (abusive, in-process): see ``allowance``.
    allowance: float | None = None

    @property
    def time_share(self) -> float:
        return self.time / self.requests if self.requests else 1.0

    @property
    def out_per_in(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0


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


@dataclass
class Report:
    capture: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(target.ok for target in self.targets)


# ---------------------------------------------------------------------- allowance

def allowance(sources: list[tuple[int, int, float, int]], leak_share: float) -> float:
    """The most time replies a filter may give a set of sources, with a margin for luck.

    ``sources`` holds, per source, (requests that reached the buckets, their time
    span in ns, the source's bucket rate per second, its burst). A GCRA bucket that
    starts full passes at most ``burst + span / interval`` requests; of the rest the
    leak answers ``leak_share`` on average. The margin is three standard deviations
    of that binomial count, plus one.
    """
    conforming = rest = 0
    for requests, span_ns, rate, burst in sources:
        interval_ns = max(1, round(1e9 / rate))
        fits = min(requests, burst + span_ns // interval_ns)
        conforming += fits
        rest += requests - fits
    spread = math.sqrt(rest * leak_share * (1 - leak_share))
    return conforming + leak_share * rest + 3 * spread + 1


# ---------------------------------------------------------------------- targets

def evaluate(report: Report) -> None:
    """Fill ``report.targets`` from its runs (issue 4's four targets)."""
    targets: list[Target] = []
    for run in report.runs:
        for group in run.groups:
            subject = f"{group.scenario} ({group.klass})"
            if group.klass == LEGITIMATE and group.requests:
                targets.append(Target(
                    run.name, "legitimate requests get time", subject,
                    group.time_share >= LEGITIMATE_TARGET,
                    f"{group.time_share:.2%} of {group.requests} (target >= "
                    f"{LEGITIMATE_TARGET:.0%})"))
            if group.klass == ABUSIVE and group.allowance is not None:
                targets.append(Target(
                    run.name, "abusive time replies within allowance", subject,
                    group.time <= group.allowance,
                    f"{group.time} time replies, allowance {group.allowance:.0f}"))
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
    report.targets = targets


# ---------------------------------------------------------------------- rendering

def _row(name: str, klass: str, group: GroupResult) -> str:
    share = f"{group.time_share:>7.1%}" if group.requests else f"{'-':>7}"
    ratio = f"{group.out_per_in:>7.3f}" if group.bytes_in else f"{'-':>7}"
    return (f"{name:<18} {klass:<10} {group.requests:>9} {group.time:>9} {group.kod:>7} "
            f"{group.drop:>9} {share} {ratio}")


def render_text(report: Report) -> str:
    capture = report.capture
    lines = [f"capture {capture.get('path', '?')}: {capture.get('packets', '?')} packets, "
             f"{capture.get('duration_s', '?')} s, seed {capture.get('seed', '?')}, "
             f"scale {capture.get('scale', '?')}"]
    for run in report.runs:
        lines += ["", f"== {run.name} ==",
                  "  ".join(f"{k} {v}" for k, v in run.settings.items()) or "(defaults)"]
        header = (f"{'scenario':<18} {'class':<10} {'requests':>9} {'time':>9} {'kod':>7} "
                  f"{'drop':>9} {'time%':>7} {'out/in':>7}")
        lines += [header, "-" * len(header)]
        for group in run.groups:
            lines.append(_row(group.scenario, group.klass, group))
        lines.append("-" * len(header))
        for klass in (LEGITIMATE, ABUSIVE):
            if any(g.klass == klass for g in run.groups):
                lines.append(_row("total", klass, run.total(klass)))
        lines.append(_row("total", "all", run.total()))
        speed = run.total().requests / run.wall_s if run.wall_s else 0.0
        lines.append(f"replayed {run.replay_s:.1f} s of traffic in {run.wall_s:.1f} s wall "
                     f"({speed:,.0f} packets/s)")
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
        failed = [t for t in report.targets if not t.ok]
        lines += ["", f"== targets: {len(report.targets) - len(failed)} of "
                      f"{len(report.targets)} met =="]
        for target in failed:
            lines.append(f"FAILED  [{target.run}] {target.name}: {target.subject}: "
                         f"{target.detail}")
        if not failed:
            lines.append("all met")
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    for run_data, run in zip(data["runs"], report.runs, strict=True):
        run_data["cpu_per_request_us"] = run.cpu_per_request_us
        for group_data, group in zip(run_data["groups"], run.groups, strict=True):
            group_data["time_share"] = group.time_share
            group_data["out_per_in"] = group.out_per_in
        run_data["totals"] = {klass: asdict(run.total(klass if klass != "all" else None))
                              for klass in (LEGITIMATE, ABUSIVE, "all")}
    data["ok"] = report.ok
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
