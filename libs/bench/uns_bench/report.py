"""Figures of a run: medians over repeats, a Markdown table, JSON."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Row:
    """One line of the table: a scenario at one load level, medians over its repeats."""

    scenario: str
    case: str
    load: str
    lost: int
    """Messages (or values) sent and never seen where they should arrive: reported first."""
    figures: dict[str, float] = field(default_factory=dict)
    """Name -> median over the repeats (rates, latencies, ratios)."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """Service -> CPU seconds per wall second (cores), median over the repeats."""
    rss_mb: dict[str, float] = field(default_factory=dict)
    """Service -> peak RSS (VmHWM), MB."""
    repeats: list[dict[str, Any]] = field(default_factory=list)
    """The figures of each repeat."""
    notes: list[str] = field(default_factory=list)
    level: int | None = None
    """The load level of a series of rows (``unit``: machines, devices): the knee is sought
    along it; None for a row that has no level to vary."""
    unit: str = ""
    series: str = ""
    """What the rows of one series share besides the scenario (the broker, the path)."""
    limits: dict[str, float] = field(default_factory=dict)
    """Figure -> the most it may be at this level (a target): a level above it missed."""
    rate: str = ""
    """The figure that is this row's message rate through a broker (compared with the
    broker ceilings of the run); empty for a row that measures no broker traffic."""
    kind: str = ""
    """The broker scenario's message kind the rate is compared with: block or slow."""
    of_ceiling: dict[str, float | None] = field(default_factory=dict)
    """Broker -> ``rate`` as a fraction of that broker's ceiling measured in this run;
    None where that ceiling was not measured (n/a)."""
    knee: str = ""
    """Set on the first level of a series that lost anything or missed a limit: why."""


def summarise(scenario: str, case: str, load: str, runs: list[dict[str, Any]]) -> Row:
    """Medians of each figure over ``runs`` (each: figures, lost, cpu, rss)."""
    figures: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rss: dict[str, float] = {}
    for run in runs:
        for k, v in run.get("figures", {}).items():
            figures.setdefault(k, []).append(v)
        for k, v in run.get("cpu", {}).items():
            cpu.setdefault(k, []).append(v)
        for k, v in run.get("rss", {}).items():
            rss[k] = max(rss.get(k, 0.0), v)
    return Row(
        scenario=scenario,
        case=case,
        load=load,
        lost=sum(int(r.get("lost", 0)) for r in runs),
        figures={k: median(v) for k, v in figures.items()},
        cpu_s={k: median(v) for k, v in cpu.items()},
        rss_mb=rss,
        repeats=runs,
        notes=sorted({n for r in runs for n in r.get("notes", [])}),
    )


def compare_with_ceilings(
    rows: list[Row], ceilings: dict[str, float], brokers: tuple[str, ...]
) -> None:
    """Each rated row's rate as a fraction of every broker's ceiling (``{broker}/{kind}``
    -> msgs/s, measured in the same run): how near the pipeline runs to what the broker
    alone passes. A ceiling not measured is None, shown as n/a."""
    for row in rows:
        if not row.rate:
            continue
        rate = row.figures.get(row.rate, 0.0)
        for broker in brokers:
            ceiling = ceilings.get(f"{broker}/{row.kind}")
            row.of_ceiling[broker] = round(rate / ceiling, 3) if ceiling else None


def misses(row: Row) -> list[str]:
    """What this row lost or which limit it passed, in words; empty if neither."""
    out = [f"lost {row.lost:,}"] if row.lost else []
    for name, limit in row.limits.items():
        value = row.figures.get(name)
        if value is not None and value > limit:
            out.append(f"{name} {_fmt(value)} > {_fmt(limit)}")
    return out


def mark_knees(rows: list[Row]) -> list[str]:
    """Find each series' knee, the lowest level that lost anything or missed a limit
    (where the pipeline stops keeping up on this machine), mark it, and say so, or say
    that every level held."""
    series: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row.level is not None:
            series.setdefault((row.scenario, row.unit, row.series), []).append(row)
    lines = []
    for (scenario, unit, case), levels in series.items():
        levels.sort(key=lambda r: r.level or 0)
        name = f"{scenario}{f', {case}' if case else ''}"
        knee = next((r for r in levels if misses(r)), None)
        if knee is None:
            limits = sorted({k for r in levels for k in r.limits})
            held = "nothing lost" + (f", {', '.join(limits)} within target" if limits else "")
            top = levels[-1].level or 0
            lines.append(f"no knee in {name}: {held} at every level up to {top:,} {unit}")
            continue
        knee.knee = "; ".join(misses(knee))
        below = [f"{r.level:,}" for r in levels if (r.level or 0) < (knee.level or 0)]
        held = f" ({', '.join(below)} {unit} held)" if below else " (the lowest level run)"
        lines.append(f"knee of {name}: {knee.level or 0:,} {unit}, {knee.knee}{held}")
    return lines


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": sys.platform,
        "load_average": list(os.getloadavg()),
    }


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def markdown(rows: list[Row], knees: list[str] | None = None) -> str:
    """One table: loss first, then the figures, the rate against the broker ceilings, CPU
    (cores) and peak RSS per service; the knees (`mark_knees`) and the notes below it."""
    lines = [
        "| scenario | case | load | lost | figures (median) | of ceiling | CPU, cores"
        " | peak RSS, MB |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items())
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_s.items())
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r.rss_mb.items())
        lost = f"**{r.lost}**" if r.lost else "0"
        case = f"{r.case} **(knee)**" if r.knee else r.case
        lines.append(
            f"| {r.scenario} | {case} | {r.load} | {lost} | {figures} | {_ceiling(r)} | {cpu}"
            f" | {rss} |"
        )
    if knees:
        lines += ["", *(f"- {k}" for k in knees)]
    notes = [f"- {r.scenario} {r.case}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _ceiling(row: Row) -> str:
    """``amqtt 0.25, mosquitto n/a (block)``; empty for a row without a broker rate."""
    if not row.rate:
        return ""
    parts = [f"{b} {'n/a' if v is None else f'{v:.3g}'}" for b, v in row.of_ceiling.items()]
    return f"{', '.join(parts) or 'n/a'} ({row.rate}, {row.kind} ceiling)"


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    """``meta["machine"]``: `machine` as it was before the run (its load average)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": meta.pop("machine", None) or machine(),
        **meta,
        "results": [msgspec.to_builtins(r) for r in rows],
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
