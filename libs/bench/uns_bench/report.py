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


def markdown(rows: list[Row]) -> str:
    """One table: loss first, then the figures, CPU (cores) and peak RSS per service."""
    lines = [
        "| scenario | case | load | lost | figures (median) | CPU, cores | peak RSS, MB |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in rows:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items())
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_s.items())
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r.rss_mb.items())
        lost = f"**{r.lost}**" if r.lost else "0"
        lines.append(f"| {r.scenario} | {r.case} | {r.load} | {lost} | {figures} | {cpu} | {rss} |")
    notes = [f"- {r.scenario} {r.case}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    """``meta["machine"]``: `machine` as it was before the run (its load average)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": meta.pop("machine", None) or machine(),
        **meta,
        "results": [msgspec.to_builtins(r) for r in rows],
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
