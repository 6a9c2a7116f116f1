"""The ``uns record`` file format, and turning a recording into a feature matrix (pure).

A recording is JSON lines, one message each::

    {"topic": "acme/pune/.../press-01/features/data", "ts": 1795334401012, "retained": false,
     "payload": {"type": "ddata", ...}}

``ts`` is when the recorder received it (ms); ``payload`` is the decoded message as
``uns sub --json`` prints it (so ``uns sub --json`` output is a recording too, without
``ts``). A message that did not decode is kept as text with an ``"error"`` field and
skipped when reading.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from uns import payloads as p
from uns.errors import PayloadError, UnsError
from uns_inference.combine import DeviceFeatures, Row
from uns_inference.options import DEFAULT_EXCLUDE


class RecordingError(UnsError):
    """A recording that cannot be read or holds nothing usable."""


class _Line(msgspec.Struct, frozen=True):
    topic: str
    payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    ts: int | None = None
    retained: bool = False
    error: str | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


def encode_line(topic: str, ts: int, retained: bool, payload: bytes) -> bytes:
    """One recording line for a received message (its payload decoded where possible)."""
    out: dict[str, Any] = {"topic": topic, "ts": ts, "retained": retained}
    if not payload:
        out["payload"] = None
    else:
        try:
            out["payload"] = p.decode(payload)
        except PayloadError as exc:
            out["payload"] = payload.decode("utf-8", errors="replace")
            out["error"] = str(exc)
    return _encoder.encode(out) + b"\n"


@dataclass(frozen=True, slots=True)
class Message:
    line: int
    topic: str
    ts: int | None
    payload: p.Payload


@dataclass
class ReadStats:
    lines: int = 0
    skipped: int = 0
    """Lines that were not JSON, did not decode, or were truncated."""


def read_messages(path: Path, stats: ReadStats | None = None) -> Iterator[Message]:
    """Every decodable message of a recording, in file order."""
    stats = stats if stats is not None else ReadStats()
    try:
        f = path.open("rb")
    except OSError as exc:
        raise RecordingError(f"{path}: {exc.strerror or exc}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                line = _line_decoder.decode(raw)
                body = bytes(line.payload)
                if line.error is not None or body == b"null":
                    stats.skipped += 1
                    continue
                payload: p.Payload = p.decode(body)
            except (msgspec.DecodeError, PayloadError):
                stats.skipped += 1
                continue
            yield Message(number, line.topic, line.ts, payload)


def data_sha256(paths: Sequence[Path]) -> str:
    """sha256 of one file; of the concatenated hex digests (in order) of several."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _features_topic(topic: str) -> tuple[str, str] | None:
    """(device path, message) of a ``{device}/features/{message}`` topic."""
    parts = topic.split("/")
    if len(parts) != 8 or parts[6] != "features":
        return None
    return "/".join(parts[:6]), parts[7]


@dataclass
class FeatureLog:
    """The features messages of recordings: births and data per device, in order."""

    announced: dict[str, set[str]] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)
    data: list[tuple[int, str, p.DeviceData]] = field(default_factory=list)
    """(run, device, message): run = index of the file."""
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def devices(self) -> list[str]:
        return sorted(self.seen)


def read_features(paths: Sequence[Path], devices: Sequence[str] = ()) -> FeatureLog:
    """Collect ``features/birth`` and ``features/data`` of the recordings.

    ``devices`` are fnmatch patterns of device paths to keep (all when empty).
    """
    log = FeatureLog()
    for run, path in enumerate(paths):
        for m in read_messages(path, log.stats):
            where = _features_topic(m.topic)
            if where is None:
                continue
            device, kind = where
            if devices and not any(fnmatch.fnmatchcase(device, d) for d in devices):
                continue
            if kind == "birth" and isinstance(m.payload, p.DeviceBirth):
                log.announced.setdefault(device, set()).update(x.name for x in m.payload.metrics)
            elif kind == "data" and isinstance(m.payload, p.DeviceData):
                names = log.seen.setdefault(device, set())
                names.update(x.name for x in m.payload.metrics)
                log.data.append((run, device, m.payload))
    return log


def choose_features(
    log: FeatureLog, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> list[str]:
    """Features every device of the log published, filtered by fnmatch patterns, sorted.

    A feature only some devices have would keep the others from ever forming a row.
    """
    if not log.seen:
        raise RecordingError("the recording holds no features/data messages")
    common = set.intersection(*log.seen.values())
    names = sorted(
        n
        for n in common
        if (not include or any(fnmatch.fnmatchcase(n, pat) for pat in include))
        and not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)
    )
    if not names:
        raise RecordingError(
            "no feature is published by every recorded device and matches the patterns"
            f" (devices: {', '.join(log.devices)})"
        )
    return names


@dataclass(frozen=True)
class Dataset:
    features: list[str]
    x: NDArray[np.float64]
    """Rows x features."""
    ts: NDArray[np.int64]
    """Data time of each row (its window's end, ms)."""
    device: list[str]
    """Device of each row."""
    run: NDArray[np.intp]
    """Run of each row: one per (file, device)."""


def matrix(log: FeatureLog, features: Sequence[str], max_age_s: float = 120.0) -> Dataset:
    """Rows as the inference service would score them (the `combine` rule): one per
    complete window of a device (every feature present for the same window end)."""
    max_age_ms = round(max_age_s * 1000)
    wanted = set(features)
    models = {"model": list(features)}
    state: dict[tuple[int, str], DeviceFeatures] = {}
    runs: dict[tuple[int, str], int] = {}
    rows: list[NDArray[np.float64]] = []
    ts: list[int] = []
    device: list[str] = []
    run: list[int] = []
    incomplete: dict[str, int] = {}
    for file_run, dev, data in log.data:
        key = (file_run, dev)
        latest = state.setdefault(key, DeviceFeatures())
        at = data.window.end if data.window is not None else data.ts
        updated = latest.update(data.metrics, at, data.window)
        if updated & wanted:
            row = latest.offer("model", features, at)
            if isinstance(row, Row):
                rows.append(row.values)
                ts.append(at)
                device.append(dev)
                run.append(runs.setdefault(key, len(runs)))
        for _, gone in latest.expire(at, max_age_ms, models):
            for name in gone.missing:
                incomplete[name] = incomplete.get(name, 0) + 1
    if not rows:
        lacking = sorted(incomplete, key=lambda n: -incomplete[n])[:5]
        raise RecordingError(
            "no complete row: no window end for which every chosen feature was present"
            + (f" (most often lacking: {', '.join(lacking)})" if lacking else "")
            + "; features of windows that never end together (waveform and slow-tag"
            " windows) make no row: choose features of one kind (--features)"
        )
    return Dataset(
        features=list(features),
        x=np.vstack(rows),
        ts=np.asarray(ts, dtype=np.int64),
        device=device,
        run=np.asarray(run, dtype=np.intp),
    )
