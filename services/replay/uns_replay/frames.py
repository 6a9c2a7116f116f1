"""Files -> frames (timestamp, metrics): pure, no I/O beyond reading the file."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterator, Sequence
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
    rows: int = 0
    """Rows read so far (a frame each, unless no value of it could be read)."""
    columns: list[str] = field(default_factory=list)
    """The file's columns (or arrays) published, as the file names them."""
    time_column: str | None = None
    delimiter: str = ","


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
    delimiter: str | None = None,
    columns: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> Recording:
    """Columns -> metrics (numbers; other cells are skipped and counted), one frame per row.

    ``delimiter`` None: sniffed from the file's start (one of ``, ; tab |``; a comma when
    it cannot tell, e.g. a single column). ``columns``: publish only these; ``ignore``:
    never these (a data set's label columns). A column is named by its header text or its
    metric name (``Bearing Temp`` or ``bearing_temp``); an unknown one is a `ConfigError`.
    """
    if delimiter is None:
        delimiter = sniff_delimiter(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise ConfigError(f"{path}: empty file, no header row")
    header = [h.strip() for h in header]
    if time_column is None:
        time_column = next((h for h in header if h.lower() in TIME_COLUMNS), None)
    elif time_column not in header:
        raise ConfigError(
            f"--time-column: {time_column!r} is not a column of {path} "
            f"(delimiter {_shown(delimiter)}; columns: {', '.join(header)})"
        )
    names = select(
        [h for h in header if h != time_column],
        columns=columns,
        ignore=ignore,
        known=header,
        where=f"{path} (delimiter {_shown(delimiter)})",
    )
    if not names:
        raise ConfigError(f"{path}: no value columns")
    recording = Recording(
        metrics=[
            MetricDef(name=_metric_name(n), datatype="double", source=f"csv:{path.name}:{n}")
            for n in names
        ],
        frames=iter(()),
        columns=names,
        time_column=time_column,
        delimiter=delimiter,
    )
    base = start_ms if start_ms is not None else int(datetime.now(UTC).timestamp() * 1000)

    def frames() -> Iterator[tuple[int, list[Metric]]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            next(reader, None)  # the header
            at = {h: i for i, h in enumerate(header)}  # a repeated name: its last column
            t_at = at[time_column] if time_column else None
            for cells in reader:
                if not cells:
                    continue  # a blank line is not a row
                i = recording.rows
                recording.rows += 1
                if t_at is not None and time_column:
                    try:
                        ts = parse_time(_cell(cells, t_at) or "")
                    except ValueError:
                        recording.skipped[time_column] = recording.skipped.get(time_column, 0) + 1
                        continue
                else:
                    ts = base + int(i * interval_s * 1000)
                metrics = []
                for name in names:
                    value = _number(_cell(cells, at[name]), decimal_comma=delimiter != ",")
                    if math.isnan(value):
                        recording.skipped[name] = recording.skipped.get(name, 0) + 1
                        continue
                    metrics.append(Metric(name=_metric_name(name), value=value))
                if metrics:
                    yield ts, metrics

    recording.frames = frames()
    return recording


DELIMITERS = ",;\t|"
"""What ``--delimiter`` is sniffed among."""


def sniff_delimiter(path: Path, sample_bytes: int = 64 * 1024) -> str:
    """The file's delimiter, from its first lines: one of `DELIMITERS`, else a comma."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        sample = f.read(sample_bytes)
    if len(sample) == sample_bytes and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole lines only: a cut one looks inconsistent
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:  # one column, or nothing to go on
        return ","


def delimiter_option(text: str) -> str:
    """``--delimiter``'s text as one character: ``tab`` and ``\\t`` are a tab."""
    if text.lower() in ("tab", "\\t", "\t"):
        return "\t"
    if len(text) != 1 or text in '\r\n"':
        raise ConfigError(f"--delimiter: {text!r} is not one character (e.g. ';', ',', '|' or tab)")
    return text


def select(
    names: list[str],
    *,
    columns: Sequence[str],
    ignore: Sequence[str],
    known: list[str],
    where: str,
) -> list[str]:
    """``names`` kept by ``--columns`` (only these, if any) and ``--ignore`` (never these).

    Each is named by its text in the file or its metric name; a name the file does not
    have is a `ConfigError` naming it, and the file's names.
    """

    def resolve(option: str, wanted: Sequence[str]) -> set[str]:
        found = set()
        for w in wanted:
            hit = [k for k in known if w in (k, _metric_name(k))]
            if not hit:
                raise ConfigError(
                    f"{option}: {w!r} is not a column of {where} (columns: {', '.join(known)})"
                )
            found.update(hit)
        return found

    only = resolve("--columns", columns) if columns else None
    never = resolve("--ignore", ignore)
    return [n for n in names if (only is None or n in only) and n not in never]


LABEL_NAMES = frozenset({"label", "labels", "anomaly", "is_anomaly", "attack", "target", "class"})
"""Column names that usually hold a data set's answers, not a sensor."""


def labels_among(recording: Recording) -> list[str]:
    """The published columns named like labels (`LABEL_NAMES`): worth a warning, since a
    label published as a tag is a feature the model then learns from."""
    return [c for c in recording.columns if _metric_name(c) in LABEL_NAMES]


def nonempty(recording: Recording, path: Path) -> Recording:
    """``recording`` as it was, or a `ConfigError` when it has not one frame to replay
    (a header alone, or no row with a readable time and value): checked before anything
    connects, so that nothing replayed is an error, not a success."""
    first = next(recording.frames, None)
    if first is None:
        unreadable = ", ".join(f"{k}: {n}" for k, n in recording.skipped.items())
        raise ConfigError(
            f"{path}: nothing to replay: "
            + (
                f"{recording.rows} rows, none with a readable time and value"
                f" (unreadable cells by column: {unreadable}; delimiter"
                f" {_shown(recording.delimiter)})"
                if recording.rows
                else "no data rows after the header"
            )
        )
    recording.frames = itertools.chain([first], recording.frames)
    return recording


def _number(text: str, *, decimal_comma: bool) -> float:
    """A cell as a number, NaN when it is not one. In a file not separated by commas,
    ``1,5`` is 1.5 (the decimal comma of the exports that use ``;`` because of it); one
    with a point too (``1.234,5``) is ambiguous and not read."""
    try:
        return float(text or "nan")
    except ValueError:
        if decimal_comma and text.count(",") == 1 and "." not in text:
            try:
                return float(text.replace(",", "."))
            except ValueError:
                pass
        return math.nan


def _cell(cells: list[str], i: int) -> str:
    return cells[i] if i < len(cells) else ""


def _shown(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else repr(delimiter)


def read_npz(
    path: Path,
    *,
    rate_hz: float | None,
    block: int = 1000,
    start_ms: int | None = None,
    columns: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> Recording:
    """1-D arrays -> waveform metrics, one frame per block; scalars (e.g. rpm) -> slow metrics.

    ``columns`` / ``ignore`` choose among the arrays by key, as `read_csv` among columns.
    """
    data = np.load(path)
    rate = rate_hz or next((float(data[k]) for k in ("rate_hz", "fs", "rate") if k in data), None)
    if rate is None:
        raise ConfigError(f"--rate: {path} does not say its sample rate; give --rate HZ")
    keys = select(
        [k for k in data.files if k not in ("rate_hz", "fs", "rate")],
        columns=columns,
        ignore=ignore,
        known=list(data.files),
        where=str(path),
    )
    waves = {k: np.asarray(data[k], dtype=np.float32) for k in keys if data[k].ndim == 1}
    scalars = {k: float(data[k]) for k in keys if data[k].ndim == 0}
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
    if n < block:
        raise ConfigError(
            f"{path}: nothing to replay: {n} samples, fewer than one block (--block {block})"
        )

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

    return Recording(metrics=metrics, frames=frames(), columns=[*waves, *scalars])


def _metric_name(column: str) -> str:
    """A column header as a metric name: lowercase, spaces and dots to underscores."""
    return (
        "".join(c if c.isalnum() or c in "-_" else "_" for c in column.strip().lower()) or "value"
    )
