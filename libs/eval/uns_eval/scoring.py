"""``uns eval``'s figures: a recording's scores and events against labels (pure, numpy).

A recording (``uns record``) of the inference's output holds, per device,
``{device}/scores/data`` (one score per window: ``anomaly_score`` and ``anomaly_threshold``,
or ``rul``/``rul_lower``/``rul_upper``, at the window's end: its data time) and
``{device}/events/anomaly`` (one ``raised``/``cleared`` pair per fault).

Labels are intervals of data time per device, from a list of windows (NAB's
``combined_windows.json``: ``[[start, end], ...]``, or ``{key: [[start, end], ...]}``) or
from a CSV's label column (each run of labelled rows one interval, from its first row to the
next unlabelled one: a label holds until the next row).
Times are ISO 8601 (naive = UTC) or epoch milliseconds; a CSV's time cells are read as
``uns replay`` reads them (a number below 1e11 is epoch seconds), so that they match the
data times of the replayed rows.

The figures, all over data time:

- **point-wise**: each scored window is one point (a window scored more than once counts
  once, with its last score), *flagged* when its score is at or above its threshold (the
  inference's breach rule), *labelled* when it holds data of a labelled interval (the
  window [start, end) overlaps it); precision, recall, F1, false-alarm rate (normal
  points flagged) and missed-alarm rate (labelled points not flagged);
- **event-level**: a labelled window is *caught* when an event is raised inside it (its
  raise time: the window end of the score that raised it); its detection delay is the
  first such raise minus the window's start; every raised event outside all windows is a
  *false event*, counted per day of scored data (summed over devices). When the
  recording holds no events, each run of consecutive flagged points is one event, raised at
  its first point;
- **RUL** (with failure times): the true remaining life at each point, clipped at a cap,
  against the prediction, at each device's last point (the C-MAPSS protocol) and over all.
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from uns import DeviceData, Event, decode
from uns.errors import PayloadError, UnsError
from uns.payloads import Payload

Interval = tuple[int, int]
DAY_MS: Final = 86_400_000
UNIT_MS: Final = {"s": 1000, "min": 60_000, "h": 3_600_000, "d": DAY_MS}
TRUE_LABELS: Final = frozenset({"1", "true", "yes", "y", "anomaly", "fault", "abnormal", "t"})
FALSE_LABELS: Final = frozenset({"", "0", "false", "no", "n", "normal", "ok", "f", "nan"})


class EvalError(UnsError):
    """An input ``uns eval`` cannot use; the message names the option or field (exit 2)."""


# ---- times ---------------------------------------------------------------------------------


def parse_time(value: Any, where: str, *, seconds: bool = False) -> int:
    """ISO 8601 (naive = UTC) or epoch milliseconds -> epoch ms. ``seconds``: a number is
    read as ``uns replay`` reads a time cell, epoch seconds below 1e11 and ms above."""
    if isinstance(value, bool):
        raise EvalError(f"{where}: {value!r} is not a time")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            try:
                moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise EvalError(
                    f"{where}: {value!r} is neither ISO 8601 (2013-12-10 06:25:00) nor epoch"
                    + (" seconds or milliseconds" if seconds else " milliseconds")
                ) from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            return round(moment.timestamp() * 1000)
    if not math.isfinite(number):
        raise EvalError(f"{where}: {value!r} is not a time")
    return round(number * 1000 if seconds and abs(number) <= 1e11 else number)


def utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the recording -------------------------------------------------------------------------


@dataclass
class Trace:
    """One device's scores (in data time order) and raised events."""

    ts: list[int] = field(default_factory=list)
    """Data time of each score: the end of the window it scored."""
    start: list[int] = field(default_factory=list)
    """The start of that window (its end when the score has no window)."""
    score: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    rul_ts: list[int] = field(default_factory=list)
    rul: list[float] = field(default_factory=list)
    rul_lower: list[float] = field(default_factory=list)
    rul_upper: list[float] = field(default_factory=list)
    raised: list[int] = field(default_factory=list)
    """Data time of each raised anomaly event."""
    has_events: bool = False


class _Line(msgspec.Struct):
    topic: str
    payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: str | None = None


_decoder = msgspec.json.Decoder(_Line)


@dataclass
class Recording:
    traces: dict[str, Trace]
    lines: int = 0
    skipped: int = 0
    """Lines that were not JSON or whose payload did not decode."""


def _where(topic: str) -> tuple[str, str, str] | None:
    parts = topic.split("/")
    if len(parts) != 8:
        return None
    return "/".join(parts[:6]), parts[6], parts[7]


def read_recording(path: Path, devices: Sequence[str] = ()) -> Recording:
    """The scores and anomaly events of a ``uns record`` file, per device (fnmatch patterns
    ``devices``: only these). A score's data time is its ``data_ts`` (else its window's
    end), an event's its ``data_ts``; an event without one (an older recording) takes the
    window end of the device's last score before it in the file (the inference publishes
    the event right after the score that raised it), never before its ``started``."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise EvalError(f"RECORDING: {path}: {exc.strerror or exc}") from None
    rec = Recording({})
    with f:
        for raw in f:
            if not raw.strip():
                continue
            rec.lines += 1
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError:
                rec.skipped += 1
                continue
            where = _where(line.topic)
            if where is None or where[1] not in ("scores", "events") or line.error is not None:
                continue
            device, stream, message = where
            if devices and not any(fnmatch.fnmatchcase(device, d) for d in devices):
                continue
            try:
                payload: Payload = decode(bytes(line.payload))
            except PayloadError:
                rec.skipped += 1
                continue
            if stream == "scores" and message == "data" and isinstance(payload, DeviceData):
                _add_scores(rec.traces.setdefault(device, Trace()), payload)
            elif stream == "events" and message == "anomaly" and isinstance(payload, Event):
                trace = rec.traces.setdefault(device, Trace())
                trace.has_events = True
                if payload.state == "raised":
                    if payload.data_ts is not None:
                        trace.raised.append(payload.data_ts)
                    else:  # a recording made before events carried their data time
                        last = trace.ts[-1] if trace.ts else payload.started
                        trace.raised.append(max(last, payload.started))
    return rec


def _add_scores(trace: Trace, data: DeviceData) -> None:
    if data.data_ts is not None:
        at = data.data_ts
    else:
        at = data.window.end if data.window is not None else data.ts
    values = {m.name: m.value for m in data.metrics}
    score, threshold = values.get("anomaly_score"), values.get("anomaly_threshold")
    if _number(score) and _number(threshold):
        trace.ts.append(at)
        trace.start.append(min(data.window.start, at) if data.window is not None else at)
        trace.score.append(float(score))  # type: ignore[arg-type]
        trace.threshold.append(float(threshold))  # type: ignore[arg-type]
    rul = values.get("rul")
    if _number(rul):
        trace.rul_ts.append(at)
        trace.rul.append(float(rul))  # type: ignore[arg-type]
        lo, hi = values.get("rul_lower"), values.get("rul_upper")
        trace.rul_lower.append(float(lo) if _number(lo) else math.nan)  # type: ignore[arg-type]
        trace.rul_upper.append(float(hi) if _number(hi) else math.nan)  # type: ignore[arg-type]


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ---- labels --------------------------------------------------------------------------------


def _windows(items: Any, where: str) -> list[Interval]:
    if not isinstance(items, list):
        raise EvalError(f"{where}: expected a list of [start, end] windows, not {items!r:.60}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise EvalError(f"{where}[{i}]: expected [start, end], not {item!r:.60}")
        a, b = (parse_time(v, f"{where}[{i}]") for v in item)
        if b < a:
            raise EvalError(f"{where}[{i}]: ends before it starts ({item[0]} > {item[1]})")
        out.append((a, b))
    return sorted(out)


def read_windows(path: Path, key: str | None = None) -> dict[str, list[Interval]]:
    """Labelled windows by device pattern (``*``: every device) from a JSON file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalError(f"--labels: {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"--labels: {path} is not JSON ({exc})") from None
    if isinstance(data, list):
        if key is not None:
            raise EvalError(f"--labels-key: {path} is a list of windows, not keyed")
        return {"*": _windows(data, "--labels")}
    if not isinstance(data, dict):
        raise EvalError(f"--labels: {path}: expected a list of windows or an object of lists")
    if key is not None:
        if key not in data:
            shown = ", ".join(list(data)[:5]) + (", ..." if len(data) > 5 else "")
            raise EvalError(f"--labels-key: {key!r} is not a key of {path} (keys: {shown})")
        return {"*": _windows(data[key], f"--labels {key}")}
    return {str(k): _windows(v, f"--labels {k}") for k, v in data.items()}


def read_label_column(
    path: Path, column: str, time_column: str | None = None, delimiter: str | None = None
) -> list[Interval]:
    """A CSV's label column as intervals: each run of labelled rows, from its first row to
    the next row (the first unlabelled one; the last row when the file ends labelled)."""
    try:
        f = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise EvalError(f"--labels: {path}: {exc.strerror or exc}") from None
    with f:
        sample = f.read(64 * 1024)
        f.seek(0)
        if delimiter is None:
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise EvalError(f"--labels: {path} has no header row")
        if time_column is None:
            time_column = next(
                (h for h in header if h.lower() in ("timestamp", "time", "ts", "datetime", "date")),
                None,
            )
            if time_column is None:
                raise EvalError(
                    f"--time-column: {path} has no column named like a time; give --time-column"
                    f" (columns: {', '.join(header)})"
                )
        for option, name in (("--label-column", column), ("--time-column", time_column)):
            if name not in header:
                raise EvalError(
                    f"{option}: {name!r} is not a column of {path} (columns: {', '.join(header)})"
                )
        ti, li = header.index(time_column), header.index(column)
        out: list[Interval] = []
        start: int | None = None
        last: int | None = None
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if max(ti, li) >= len(row):
                raise EvalError(f"--labels: {path} line {number}: fewer cells than the header")
            t = parse_time(row[ti], f"--time-column {time_column!r}, line {number}", seconds=True)
            on = _label(row[li], f"--label-column {column!r}, line {number}")
            if on and start is None:
                start = t
            elif not on and start is not None:
                out.append((start, t))  # a label holds until the next row says otherwise
                start = None
            last = t
        if start is not None:
            out.append((start, last if last is not None else start))
    return out


def _label(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_LABELS:
        return True
    if value in FALSE_LABELS:
        return False
    try:
        return float(value) != 0
    except ValueError:
        raise EvalError(
            f"{where}: {text!r} is not a label (0/1, true/false, normal/anomaly)"
        ) from None


def labels_for(
    devices: Sequence[str], keyed: Mapping[str, list[Interval]]
) -> dict[str, list[Interval]]:
    """Each device's windows: those of every key (a device path or fnmatch pattern) it
    matches. A keyed file none of whose keys matches a device is an error."""
    out = {
        d: sorted(w for k, ws in keyed.items() if fnmatch.fnmatchcase(d, k) for w in ws)
        for d in devices
    }
    if (
        keyed
        and "*" not in keyed
        and not any(fnmatch.fnmatchcase(d, k) for d in devices for k in keyed)
    ):
        shown = ", ".join(list(keyed)[:5]) + (", ..." if len(keyed) > 5 else "")
        raise EvalError(
            f"--labels: no key names a recorded device (keys: {shown}; devices:"
            f" {', '.join(devices[:5])}); give --labels-key KEY to apply one key's windows"
            " to every device"
        )
    return out


def read_failures(path: Path) -> dict[str, int]:
    """``--failures``: ``{device or pattern: failure time}`` (JSON)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalError(f"--failures: {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"--failures: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise EvalError(f"--failures: {path}: expected an object {{device: failure time}}")
    return {str(k): parse_time(v, f"--failures {k}") for k, v in data.items()}


# ---- the figures ---------------------------------------------------------------------------


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _point(tp: int, fp: int, fn: int, tn: int) -> dict[str, Any]:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall
        else None
    )
    return {
        "points": tp + fp + fn + tn,
        "labelled": tp + fn,
        "flagged": tp + fp,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_alarm_rate": _ratio(fp, fp + tn),
        "missed_alarm_rate": _ratio(fn, tp + fn),
    }


def _overlaps(
    start: NDArray[np.int64], end: NDArray[np.int64], windows: Sequence[Interval]
) -> NDArray[np.bool_]:
    """Scored windows [start, end) that hold data of a labelled window [a, b) (a score
    without a window: its time inside [a, b])."""
    hit = np.zeros(len(end), dtype=bool)
    instant = start == end
    for a, b in windows:
        hit |= ((start < b) & (end > a)) | (instant & (end >= a) & (end <= b))
    return hit


def _flagged_runs(ts: NDArray[np.int64], flagged: NDArray[np.bool_]) -> list[int]:
    starts = flagged & ~np.concatenate(([False], flagged[:-1]))
    return [int(t) for t in ts[starts]]


def evaluate(
    rec: Recording,
    labels: Mapping[str, list[Interval]],
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    failures: Mapping[str, int] | None = None,
    rul_cap: float | None = None,
    rul_unit: str = "h",
) -> dict[str, Any]:
    """The figures of `rec` against each device's labelled windows (`labels_for`), over
    data time in [start_ms, end_ms] (everything when None)."""
    lo = start_ms if start_ms is not None else -(2**62)
    hi = end_ms if end_ms is not None else 2**62
    totals = [0, 0, 0, 0]
    per_device: dict[str, Any] = {}
    windows_out: list[dict[str, Any]] = []
    false_at: list[tuple[str, int]] = []
    events_at: list[dict[str, Any]] = []
    span_ms = 0
    repeated = 0
    sources = set()
    for device in sorted(rec.traces):
        trace = rec.traces[device]
        ts = np.asarray(trace.ts, dtype=np.int64)
        keep = (ts >= lo) & (ts <= hi)
        order = np.argsort(ts[keep], kind="stable")
        ts = ts[keep][order]
        if not len(ts):
            continue
        # one point per window: a window scored again (an inference scoring each features
        # message of it) counts once, with its last score
        last = np.append(ts[1:] != ts[:-1], True)
        repeated += int((~last).sum())
        ts = ts[last]
        start = np.asarray(trace.start, dtype=np.int64)[keep][order][last]
        score = np.asarray(trace.score, dtype=np.float64)[keep][order][last]
        threshold = np.asarray(trace.threshold, dtype=np.float64)[keep][order][last]
        windows = list(labels.get(device, []))
        flagged = score >= threshold
        labelled = _overlaps(start, ts, windows)
        tp = int((flagged & labelled).sum())
        fp = int((flagged & ~labelled).sum())
        fn = int((~flagged & labelled).sum())
        tn = int((~flagged & ~labelled).sum())
        for i, v in enumerate((tp, fp, fn, tn)):
            totals[i] += v
        if trace.has_events:
            raised = sorted(t for t in trace.raised if lo <= t <= hi)
            sources.add("events")
        else:
            raised = _flagged_runs(ts, flagged)
            sources.add("flagged runs")
        span_ms += int(ts[-1] - ts[0]) if len(ts) > 1 else 0
        caught = 0
        for a, b in windows:
            inside = [t for t in raised if a <= t <= b]
            caught += bool(inside)
            windows_out.append(
                {
                    "device": device,
                    "start": utc(a),
                    "end": utc(b),
                    "events": len(inside),
                    "first_event": utc(inside[0]) if inside else None,
                    "delay_s": (inside[0] - a) / 1000 if inside else None,
                }
            )
        false = [t for t in raised if not any(a <= t <= b for a, b in windows)]
        false_at.extend((device, t) for t in false)
        for t in raised:
            hit = next((i for i, (a, b) in enumerate(windows) if a <= t <= b), None)
            events_at.append({"device": device, "at": utc(t), "at_ms": t, "window": hit})
        per_device[device] = {
            **_point(tp, fp, fn, tn),
            "labelled_windows": len(windows),
            "caught": caught,
            "events": len(raised),
            "false_events": len(false),
        }
    points = sum(totals)
    if not points and not any(t.rul for t in rec.traces.values()):
        raise EvalError(
            "RECORDING: no anomaly score (scores/data with anomaly_score and anomaly_threshold)"
            + (" between --from and --to" if start_ms is not None or end_ms is not None else "")
            + f" in {rec.lines} lines"
            + (f" ({rec.skipped} unreadable)" if rec.skipped else "")
            + "; record the inference's {device}/scores/# and {device}/events/#"
        )
    delays = [w["delay_s"] for w in windows_out if w["delay_s"] is not None]
    days = span_ms / DAY_MS
    out: dict[str, Any] = {
        "devices": len(per_device),
        "from": utc(start_ms) if start_ms is not None else None,
        "to": utc(end_ms) if end_ms is not None else None,
        "point": _point(*totals),
        "repeated_scores": repeated,
        "event": {
            "source": " and ".join(sorted(sources)),
            "labelled_windows": len(windows_out),
            "caught": sum(1 for w in windows_out if w["events"]),
            "median_delay_s": float(np.median(delays)) if delays else None,
            "events": len(events_at),
            "false_events": len(false_at),
            "days": days,
            "false_per_day": len(false_at) / days if days else None,
            "false_at": [
                {"device": d, "at": utc(t)} for d, t in sorted(false_at, key=lambda x: x[1])
            ],
        },
        "windows": windows_out,
        "events": events_at,
        "per_device": per_device,
    }
    if failures:
        out["rul"] = rul_figures(rec, failures, cap=rul_cap, unit=rul_unit, lo=lo, hi=hi)
    return out


def _rul_stats(
    pred: NDArray[np.float64],
    truth: NDArray[np.float64],
    lower: NDArray[np.float64],
    upper: NDArray[np.float64],
) -> dict[str, Any]:
    error = pred - truth
    inside = (truth >= lower) & (truth <= upper)
    known = np.isfinite(lower) & np.isfinite(upper)
    return {
        "points": len(pred),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "phm08": float(np.where(error < 0, np.exp(-error / 13) - 1, np.exp(error / 10) - 1).sum()),
        "interval_coverage": float(inside[known].mean()) if known.any() else None,
    }


def rul_figures(
    rec: Recording,
    failures: Mapping[str, int],
    *,
    cap: float | None,
    unit: str,
    lo: int,
    hi: int,
) -> dict[str, Any]:
    """Predicted vs true remaining life (failure time - data time, in ``unit``, clipped at
    ``cap``) at each device's last score, and over every score."""
    per_unit = UNIT_MS[unit]
    last: list[tuple[float, float, float, float]] = []
    every: list[tuple[float, float, float, float]] = []
    for device in sorted(rec.traces):
        trace = rec.traces[device]
        failure = next((t for k, t in failures.items() if fnmatch.fnmatchcase(device, k)), None)
        if failure is None or not trace.rul:
            continue
        rows = sorted(
            (t, r, a, b)
            for t, r, a, b in zip(
                trace.rul_ts, trace.rul, trace.rul_lower, trace.rul_upper, strict=True
            )
            if lo <= t <= hi
        )
        for t, r, a, b in rows:
            truth = (failure - t) / per_unit
            if cap is not None:
                truth = min(truth, cap)
            every.append((r, truth, a, b))
        if rows:
            last.append(every[-1])
    if not last:
        raise EvalError(
            "--failures: no device with RUL scores (scores/data with rul) is named in it"
        )
    a_last, a_every = np.array(last), np.array(every)
    return {
        "unit": unit,
        "cap": cap,
        "devices": len(last),
        "at_last_point": _rul_stats(*a_last.T),
        "every_point": _rul_stats(*a_every.T),
    }


# ---- what a user reads ---------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if abs(s) >= 3600:
        return f"{s / 3600:.1f} h"
    if abs(s) >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:g} s"


def summary(report: Mapping[str, Any]) -> list[str]:
    """The report as lines for a terminal."""
    lines = []
    pt, ev = report["point"], report["event"]
    if pt["points"]:
        lines += [
            f"points: {pt['points']} scored windows on {report['devices']} device(s),"
            f" {pt['labelled']} labelled, {pt['flagged']} flagged",
            f"point-wise: precision {_num(pt['precision'])}  recall {_num(pt['recall'])}"
            f"  F1 {_num(pt['f1'])}",
            f"false-alarm rate {_pct(pt['false_alarm_rate'])} (normal windows flagged)"
            f"  missed-alarm rate {_pct(pt['missed_alarm_rate'])} (labelled windows not flagged)",
            f"events ({ev['source']}): {ev['events']}; labelled windows caught"
            f" {ev['caught']} of {ev['labelled_windows']}; median detection delay"
            f" {_duration(ev['median_delay_s'])}; false events {ev['false_events']}"
            f" ({_num(ev['false_per_day'], '.2f')} per day over {ev['days']:.1f} device-days)",
        ]
        if report["repeated_scores"]:
            lines.append(
                f"  ({report['repeated_scores']} repeated scores of a window counted once:"
                " the window's last score)"
            )
        for w in report["windows"]:
            got = (
                f"caught at {w['first_event']} ({_duration(w['delay_s'])} in),"
                f" {w['events']} event(s)"
                if w["events"]
                else "MISSED"
            )
            lines.append(f"  window {w['start']} .. {w['end']} ({w['device']}): {got}")
        for f in ev["false_at"][:20]:
            lines.append(f"  false event at {f['at']} ({f['device']})")
        if len(ev["false_at"]) > 20:
            lines.append(f"  ... and {len(ev['false_at']) - 20} more false events")
    rul = report.get("rul")
    if rul:
        for where in ("at_last_point", "every_point"):
            r = rul[where]
            capped = f", true RUL capped at {rul['cap']:g}" if rul["cap"] is not None else ""
            lines.append(
                f"RUL {where.replace('_', ' ')} ({r['points']} points, {rul['unit']}{capped}):"
                f" RMSE {r['rmse']:.2f}  MAE {r['mae']:.2f}  PHM08 {r['phm08']:.0f}"
                f"  interval coverage {_pct(r['interval_coverage'])}"
            )
    return lines
