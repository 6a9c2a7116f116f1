"""Files -> frames (timestamp, metrics): pure, no I/O beyond reading the file."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from uns import Metric, MetricDef, Waveform
from uns.errors import ConfigError

TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date")


@dataclass
class Recording:
    """What a file holds: the metric definitions and the frames, lazily."""

    metrics: list[MetricDef]
    frames: Iterator[tuple[int, list[Metric]]]
    skipped: dict[str, int] = field(default_factory=dict)
    """Values that could not be read, by column."""


def parse_time(text: str) -> int:
    """ISO 8601 (``2013-12-02 21:15:00``, naive = UTC) or epoch seconds/milliseconds -> ms."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    return int(number if number > 1e11 else number * 1000)


def read_csv(
    path: Path,
    *,
    time_column: str | None = None,
    interval_s: float = 1.0,
    start_ms: int | None = None,
) -> Recording:
    """Columns -> metrics (numbers; other cells are skipped and counted), one frame per row."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ConfigError(f"{path}: empty file, no header row")
    header = [h.strip() for h in header]
    if time_column is None:
        time_column = next((h for h in header if h.lower() in TIME_COLUMNS), None)
    elif time_column not in header:
        raise ConfigError(
            f"--time-column: {time_column!r} is not a column of {path} "
            f"(columns: {', '.join(header)})"
        )
    names = [h for h in header if h != time_column]
    if not names:
        raise ConfigError(f"{path}: no value columns")
    recording = Recording(
        metrics=[
            MetricDef(name=_metric_name(n), datatype="double", source=f"csv:{path.name}:{n}")
            for n in names
        ],
        frames=iter(()),
    )
    base = start_ms if start_ms is not None else int(datetime.now(UTC).timestamp() * 1000)

    def frames() -> Iterator[tuple[int, list[Metric]]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader):
                if time_column:
                    try:
                        ts = parse_time(row[time_column] or "")
                    except ValueError:
                        recording.skipped[time_column] = recording.skipped.get(time_column, 0) + 1
                        continue
                else:
                    ts = base + int(i * interval_s * 1000)
                metrics = []
                for name in names:
                    try:
                        value = float(row.get(name) or "nan")
                    except ValueError:
                        value = math.nan
                    if math.isnan(value):
                        recording.skipped[name] = recording.skipped.get(name, 0) + 1
                        continue
                    metrics.append(Metric(name=_metric_name(name), value=value))
                if metrics:
                    yield ts, metrics

    recording.frames = frames()
    return recording


def read_npz(
    path: Path, *, rate_hz: float | None, block: int = 1000, start_ms: int | None = None
) -> Recording:
    """1-D arrays -> waveform metrics, one frame per block; scalars (e.g. rpm) -> slow metrics."""
    data = np.load(path)
    rate = rate_hz or next((float(data[k]) for k in ("rate_hz", "fs", "rate") if k in data), None)
    if rate is None:
        raise ConfigError(f"--rate: {path} does not say its sample rate; give --rate HZ")
    waves = {k: np.asarray(data[k], dtype=np.float32) for k in data.files if data[k].ndim == 1}
    scalars = {
        k: float(data[k])
        for k in data.files
        if data[k].ndim == 0 and k not in ("rate_hz", "fs", "rate")
    }
    if not waves:
        raise ConfigError(f"{path}: no 1-D array to replay (keys: {', '.join(data.files)})")
    metrics = [
        MetricDef(
            name=_metric_name(k), datatype="waveform", rate_hz=rate, source=f"npz:{path.name}:{k}"
        )
        for k in waves
    ]
    metrics += [
        MetricDef(name=_metric_name(k), datatype="double", source=f"npz:{path.name}:{k}")
        for k in scalars
    ]
    t0_us = (start_ms if start_ms is not None else int(datetime.now(UTC).timestamp() * 1000)) * 1000
    n = min(len(w) for w in waves.values())

    def frames() -> Iterator[tuple[int, list[Metric]]]:
        for i, start in enumerate(range(0, n - block + 1, block)):
            t_us = t0_us + int(start * 1e6 / rate)
            out = [
                Metric(
                    name=_metric_name(k),
                    value=Waveform.from_values(
                        w[start : start + block], t0_us=t_us, rate_hz=rate, block=i
                    ),
                )
                for k, w in waves.items()
            ]
            if i == 0:
                out += [Metric(name=_metric_name(k), value=v) for k, v in scalars.items()]
            yield t_us // 1000, out

    return Recording(metrics=metrics, frames=frames())


def _metric_name(column: str) -> str:
    """A column header as a metric name: lowercase, spaces and dots to underscores."""
    return (
        "".join(c if c.isalnum() or c in "-_" else "_" for c in column.strip().lower()) or "value"
    )
