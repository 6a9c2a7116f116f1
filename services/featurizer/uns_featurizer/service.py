from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from uns import (
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    DevicePath,
    Inbound,
    Metric,
    MetricDef,
    Node,
    Reject,
    Service,
    SignalWindow,
    Throttled,
    TopicError,
    Waveform,
    Window,
    now_ms,
)
from uns.payloads import SEQ_MODULUS
from uns.topics import device_filter
from uns_featurizer.features import (
    SLOW_UNITS,
    WAVEFORM_UNITS,
    BearingGeometry,
    slow_features,
    waveform_features,
)
from uns_featurizer.settings import FeaturizerSettings
from uns_featurizer.windows import (
    LOGGED,
    Excluded,
    SlowWindow,
    TimeBounds,
    WaveformWindow,
    as_number,
    short,
)

log = logging.getLogger(__name__)

MAX_NAME: Final = 256
"""Characters in a metric name at most: each becomes five or more feature names in a birth."""
NUMERIC: Final = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float", "double"}
)
TAGS_PER_MESSAGE: Final = 1_000
"""Slow tags in one features message at most (5,000 metrics, ~250 kB: within the contract's
10,000 items and 1 MiB); a device with more gets several messages for the window end."""
MAX_RPM: Final = 600_000.0
"""A shaft speed above this (10 kHz) is no speed: the bearing frequencies ignore it."""


@dataclass
class _Device:
    path: DevicePath
    units: dict[str, str] = field(default_factory=dict)
    waveforms: set[str] = field(default_factory=set)
    datatypes: dict[str, str] = field(default_factory=dict)
    """What the raw birth declared of each metric: a value of another kind is excluded."""
    rates: dict[str, float] = field(default_factory=dict)
    """The sample rate the birth declared of each waveform (a block at another is refused)."""
    wave: dict[str, WaveformWindow] = field(default_factory=dict)
    slow: dict[str, SlowWindow] = field(default_factory=dict)
    speed_rpm: float | None = None
    announced: dict[str, MetricDef] = field(default_factory=dict)
    phase_ms: int = 0
    """Where in the hop this device's slow windows end (the same for all its tags)."""
    node: str | None = None
    """The node whose raw birth announced the device (before any birth: the first node whose
    data came); only its data and deaths are trusted."""
    bdseq: int | None = None
    """The birth/death sequence of that birth: an older session's death is stale."""
    dead: bool = False
    """Its announcing node said the device died: nothing is windowed until a new birth."""
    wave_defs: dict[str, dict[str, tuple[str, str, str]]] = field(default_factory=dict)
    """Each waveform's features' (name, unit, description), made once per birth."""
    complete: set[str] = field(default_factory=set)
    """Slow tags whose every feature has been announced: their windows need no definitions
    (made per window, not kept: 1.4 kB a tag, 2 bytes a held sample)."""
    held: int = 0
    held_bytes: int = 0
    """Samples its slow windows hold and their bytes, as of its last window published."""
    pending: dict[int, list[_Features]] = field(default_factory=dict)
    """Slow-tag windows closed but not yet published, by window end: they go out in one
    message per window end once every slow tag of the device has closed it."""

    def forget(self, reason: str) -> None:
        """Drop every window's buffered samples (counted under ``reason``)."""
        for w in self.wave.values():
            w.reset(reason)
        for s in self.slow.values():
            s.reset(reason)


class Featurizer(Service[FeaturizerSettings]):
    """Raw data in, features out, per device.

    Subscribes to ``+/+/+/+/+/+/raw/birth`` (units, which metrics are waveforms),
    ``+/+/+/+/+/+/raw/data`` and ``+/+/+/+/+/+/raw/death``; publishes
    ``{device}/features/birth`` and ``{device}/features/data``: one message per waveform
    window, and one per device per slow-tag window end with every slow tag's features and
    each tag's provenance (``signals``). Data and deaths are trusted only from the node
    whose birth announced the device.
    """

    name = "featurizer"
    shard_by_device = True
    Settings = FeaturizerSettings

    def __init__(self, node: Node[FeaturizerSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.devices: dict[DevicePath, _Device] = {}
        self._topics: dict[str, _Device] = {}
        """Each raw data topic's device: parsing the path was 5 % of a slow-tag message."""
        self.assets = {d.path: d.asset for d in node.config.plant.devices}
        node.subscribe(device_filter(stream="raw", message="birth"), DeviceBirth, self.on_birth)
        node.subscribe(device_filter(stream="raw", message="data"), DeviceData, self.on_data)
        node.subscribe(device_filter(stream="raw", message="death"), DeviceDeath, self.on_death)
        m = node.metrics
        self.windows = m.counter(
            "uns_featurizer_windows_total",
            "Windows turned into features",
            ["kind"],
            zeros=("waveform", "slow"),
        )
        self.excluded = m.counter(
            "uns_featurizer_samples_excluded_total",
            "Samples kept out of features, by reason",
            ["reason"],
        )
        self.compute = m.histogram(
            "uns_featurizer_compute_seconds",
            "Time to compute one window's features",
            ["kind"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1),
        )
        # What the slow-tag windows hold, as of each device's last window closed (summed
        # then, not per sample): bytes / samples is the cost of a held sample.
        m.gauge(
            "uns_featurizer_slow_samples_held",
            "Slow-tag samples held for the windows to come (as of each device's last window)",
        ).labels().set_function(lambda: sum(d.held for d in list(self.devices.values())))
        m.gauge(
            "uns_featurizer_slow_held_bytes",
            "Bytes of the slow-tag samples held (as of each device's last window)",
        ).labels().set_function(lambda: sum(d.held_bytes for d in list(self.devices.values())))
        self._wave_hop = s.waveform.hop or s.waveform.window
        self._slow_ms = int(s.slow.window_s * 1000), int(s.slow.hop_s * 1000)
        t = s.timestamps
        self._bounds = TimeBounds(
            max_future_ms=int(t.max_future_s * 1000),
            max_past_ms=None if t.max_past_s is None else int(t.max_past_s * 1000),
            max_jump_ms=int(t.max_jump_s * 1000),
            resync_after=t.resync_after,
        )
        self._throttled = Throttled(logger=log)
        self._ignore = frozenset(s.ignore)
        self._bands = tuple(s.waveform.bands)
        self._compute_waveform = self.compute.labels("waveform")
        self._speed_tags = frozenset(s.speed_tags)

    @staticmethod
    def _path(topic: str) -> DevicePath:
        """The device of a raw topic; a level that is no slug matches ``+`` too: refused."""
        try:
            return DevicePath.parse(topic.rsplit("/", 2)[0])
        except TopicError as exc:
            raise Reject("topic", str(exc)) from None

    def _device(self, topic: str) -> _Device:
        device = self._topics.get(topic)
        if device is not None:
            return device
        path = self._path(topic)
        device = self.devices.get(path)
        if device is None:
            if len(self.devices) >= self.settings.max_devices and str(path) not in self.assets:
                # the plant's own devices always get in: made-up paths cannot crowd them out
                raise Reject(
                    "too_many_devices",
                    f"{path}: already windowing {len(self.devices)} devices (max_devices)",
                )
            hop_ms = self._slow_ms[1]
            phase = zlib.crc32(str(path).encode()) % hop_ms if self.settings.slow.stagger else 0
            device = self.devices[path] = _Device(path, phase_ms=phase)
        if len(self._topics) < 3 * self.settings.max_devices:  # birth, data, death of each
            self._topics[topic] = device
        return device

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        device = self._device(msg.topic)
        birth = msg.payload
        if not 0 <= birth.bdseq < SEQ_MODULUS:
            raise Reject("bdseq", f"{device.path}: a raw birth of bdseq {short(birth.bdseq)}")
        if birth.device and birth.device != str(device.path):
            raise Reject(
                "topic_mismatch", f"a raw birth for {short(birth.device)} on {device.path}'s topic"
            )
        if device.node is not None and birth.node != device.node:
            # Sparkplug: the newest birth wins. Still say so, since a second adapter for
            # the same device (or a forged birth) changes whose data is trusted, and the
            # other node's samples must not end up in the same windows.
            self._throttled.warning(
                f"node-{device.path}",
                "%s: raw data now announced by node %s (was by %s): only its data is windowed",
                device.path,
                short(birth.node),
                short(device.node),
            )
            await self._flush_slow(device, force=True)
            device.forget("node_change")
            self._count_device(device)
        elif device.dead:
            self._throttled.log(
                logging.INFO,
                f"alive-{device.path}",
                "%s: announced again by node %s: windowing resumes",
                device.path,
                short(birth.node),
            )
        device.node, device.bdseq, device.dead = birth.node, birth.bdseq, False
        device.units = {m.name: m.unit for m in birth.metrics}
        device.wave_defs.clear()
        device.datatypes = {m.name: m.datatype for m in birth.metrics}
        device.waveforms = {m.name for m in birth.metrics if m.datatype == "waveform"}
        w = self.settings.waveform
        device.rates = {
            m.name: m.rate_hz
            for m in birth.metrics
            if m.datatype == "waveform"
            and isinstance(m.rate_hz, float)
            and w.min_rate_hz <= m.rate_hz <= w.max_rate_hz
        }

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        device = self.devices.get(self._path(msg.topic))
        if device is None or device.node is None or device.dead:
            return  # nothing windowed: e.g. the retained death of a device gone before we began
        death = msg.payload
        if death.node != device.node:
            raise Reject(
                "foreign_node",
                f"{device.path}: a raw death from node {short(death.node)}, but node"
                f" {short(device.node)} announced the device; still windowing it",
            )
        if not 0 <= death.bdseq < SEQ_MODULUS:
            raise Reject("bdseq", f"{device.path}: a raw death of bdseq {short(death.bdseq)}")
        if device.bdseq is not None and (death.bdseq - device.bdseq) % SEQ_MODULUS >= (
            SEQ_MODULUS // 2
        ):
            raise Reject(
                "stale_death",
                f"{device.path}: a raw death of session {death.bdseq}, older than the birth's"
                f" {device.bdseq}; still windowing it",
            )
        self._throttled.warning(
            f"death-{device.path}",
            "%s: raw stream died (node %s: %s): stops windowing it until it is announced again",
            device.path,
            short(death.node),
            short(death.reason or "no reason given"),
        )
        device.dead = True
        device.speed_rpm = None
        await self._flush_slow(device, force=True)  # the windows it closed are complete
        device.forget("device_death")
        self._count_device(device)

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        device = self._device(msg.topic)
        data = msg.payload
        if device.node is None:  # no birth seen (yet): the first node to send owns the device
            device.node = data.node
        elif data.node != device.node:
            raise Reject(
                "foreign_node",
                f"{device.path}: raw data from node {short(data.node)}, but node"
                f" {short(device.node)} announced the device",
            )
        if device.dead:
            raise Reject(
                "unannounced",
                f"{device.path}: raw data from node {short(data.node)} after the device's death,"
                " without a new birth",
            )
        s = self.settings
        now = now_ms()
        seq = data.seq if isinstance(data.seq, int) and 0 <= data.seq < SEQ_MODULUS else None
        slow: list[_Features] = []
        node, windows, datatypes = data.node, device.slow, device.datatypes
        for m in data.metrics:
            value: Any = m.value  # narrowed by type() below, which mypy does not follow
            name = m.name
            kind = type(value)
            if (kind is float or kind is int) and (window_s := windows.get(name)) is not None:
                # The hot path: a number of a tag already windowed (its name was checked
                # then; ignored names never get a window), unless a new birth made it a
                # waveform.
                good = m.quality == "good"
                if datatypes.get(name) != "waveform":
                    if good and name in self._speed_tags:
                        self._speed(device, value)
                    ts = data.ts if m.ts is None else m.ts
                    if kind is float:
                        closed = window_s.push(ts, value, good, seq, node, now)
                        if closed is None:  # held: nothing closed, nothing excluded
                            continue
                    else:
                        closed = window_s.add(ts, value, good=good, seq=seq, node=node, now_ms=now)
                    for ts_arr, values, prov in closed:
                        slow.append(self._slow(device, name, ts_arr, values, prov))
                    if window_s.has_excluded:
                        self._count(device, name, window_s.excluded)
                    continue
            good = m.quality == "good"
            declared = datatypes.get(name)
            if len(name) > MAX_NAME:
                self._exclude("name", f"{device.path}: a metric name of {len(name)} characters")
                continue
            if isinstance(value, Waveform):
                if declared is not None and declared != "waveform":
                    self._exclude("type", f"{device.path} {name}: a waveform, declared {declared}")
                    continue
                window = device.wave.get(name)
                if window is None:
                    if not self._room(device, name):
                        continue
                    window = device.wave[name] = WaveformWindow(
                        s.waveform.window,
                        self._wave_hop,
                        bounds=self._bounds,
                        min_rate_hz=s.waveform.min_rate_hz,
                        max_rate_hz=s.waveform.max_rate_hz,
                        max_block=s.waveform.max_block,
                    )
                for samples, rate, prov in window.add(
                    value,
                    seq=seq,
                    node=data.node,
                    good=good,
                    now_ms=now,
                    rate_hz=device.rates.get(name),
                ):
                    await self._waveform(device, name, samples, rate, prov)
                self._count(device, name, window.excluded)
                continue
            if name in self._ignore:
                continue
            if declared == "waveform":
                self._exclude(
                    "type", f"{device.path} {name}: a {type(value).__name__}, declared waveform"
                )
                continue
            raw: float | None = None
            refuse = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                raw = value
            elif value is not None:
                if declared not in NUMERIC:
                    continue  # strings and states: not trended
                refuse = ("type", f"a {type(value).__name__} value, declared {declared}")
            if name in self._speed_tags and good:
                self._speed(device, raw)
            window_s = device.slow.get(name)
            if window_s is None:
                if not self._room(device, name):
                    continue
                window_s = device.slow[name] = SlowWindow(
                    *self._slow_ms, device.phase_ms, bounds=self._bounds
                )
            ts = m.ts if m.ts is not None else data.ts
            for ts_arr, values, prov in window_s.add(
                ts, raw, good=good, seq=seq, node=data.node, now_ms=now, refuse=refuse
            ):
                slow.append(self._slow(device, name, ts_arr, values, prov))
            if window_s.has_excluded:
                self._count(device, name, window_s.excluded)
        for r in slow:
            device.pending.setdefault(r.window.end, []).append(r)
        if device.pending:
            await self._flush_slow(device)

    @staticmethod
    def _speed(device: _Device, raw: float | None) -> None:
        speed = as_number(raw)
        if speed is not None and 0 < speed <= MAX_RPM:  # not NaN, inf or absurd
            device.speed_rpm = speed

    async def _flush_slow(self, device: _Device, *, force: bool = False) -> None:
        """Publish the pending slow-tag windows that are complete: one message per window
        end, once each slow tag of the device has closed that window (its next window ends
        later), or has fallen a hop behind it (a tag gone quiet is not waited for), or some
        tag has already closed the window after it (a tag late by a whole hop is not
        waited for either). ``force``: all of them (the device died or changed node)."""
        hop = self._slow_ms[1]
        ends = [w.next_end for w in device.slow.values() if w.next_end is not None]
        ahead = max(ends, default=0)
        ready = [
            end
            for end in sorted(device.pending)
            if force
            or ahead > end + hop
            or all(e > end or e < end for e in ends)  # e == end: that tag may still close it
        ]
        if ready:
            device.held = sum(w.held for w in device.slow.values())
            device.held_bytes = sum(w.nbytes for w in device.slow.values())
        for end in ready:
            results = device.pending.pop(end)
            for i in range(0, len(results), TAGS_PER_MESSAGE):
                await self._publish_slow(device, results[i : i + TAGS_PER_MESSAGE])

    def _room(self, device: _Device, name: str) -> bool:
        """Whether the device may have one more signal windowed (excluded when not)."""
        if len(device.wave) + len(device.slow) < self.settings.max_signals:
            return True
        self._exclude(
            "too_many_signals",
            f"{device.path} {name}: already windowing {self.settings.max_signals} signals"
            " (max_signals)",
        )
        return False

    def _exclude(self, reason: str, detail: str, n: int = 1) -> None:
        self.excluded.labels(reason).inc(n)
        self._throttled.warning(reason, "%s: excluded (%s): %s", self.node.id, reason, detail)

    def _count_device(self, device: _Device) -> None:
        windows: list[tuple[str, WaveformWindow | SlowWindow]] = [
            *device.wave.items(),
            *device.slow.items(),
        ]
        for name, w in windows:
            self._count(device, name, w.excluded)

    def _count(self, device: _Device, signal: str, excluded: Excluded) -> None:
        """Move a window's exclusions to the metric; log the ones a sender got wrong."""
        if not excluded.counts and not excluded.details:
            return
        for reason, n in excluded.counts.items():
            self.excluded.labels(reason).inc(n)
        for reason, detail in excluded.details.items():
            if reason not in LOGGED:
                continue
            n = excluded.counts.get(reason, 0)
            what = f"{n} samples excluded ({reason})" if n != 1 else f"1 sample excluded ({reason})"
            self._throttled.warning(
                reason,
                "%s: %s %s: %s: %s",
                self.node.id,
                device.path,
                signal,
                what if n else reason,
                detail,
            )
        excluded.counts.clear()
        excluded.details.clear()

    async def _waveform(
        self, device: _Device, signal: str, samples: np.ndarray, rate: float, window: Window
    ) -> None:
        s = self.settings
        shaft_hz = device.speed_rpm / 60.0 if device.speed_rpm else None
        b = s.bearings.get(self.assets.get(str(device.path), ""), s.bearing)
        geometry = BearingGeometry(b.balls, b.ball_mm, b.pitch_mm, b.contact_deg)
        started = time.perf_counter()
        # In the event loop, not a worker thread: the hop there and back (a future, a
        # self-pipe write to wake the loop) cost half as much as the maths, which holds
        # the GIL for most of its 1-2 ms anyway.
        feats = waveform_features(
            samples,
            rate,
            bands=self._bands,
            shaft_hz=shaft_hz,
            bearing=geometry,
            envelope_band=s.waveform.envelope_band,
        )
        self._compute_waveform.observe(time.perf_counter() - started)
        feats = self._finite(device, signal, feats)
        unit = device.units.get(signal, "")
        known = device.wave_defs.setdefault(signal, {})
        defs = {}
        for name in feats:
            d = known.get(name)
            if d is None:
                base_unit, description = WAVEFORM_UNITS.get(name, ("g2", "Energy in the band"))
                if name.startswith("band_"):
                    description = f"Energy between {name[5:].replace('_', ' and ')} Hz"
                d = known[name] = (f"{signal}.{name}", _scaled_unit(base_unit, unit), description)
            defs[d[0]] = d[1], d[2]
        await self._publish_all(device, [_Features(feats, signal, defs, window)], "waveform")

    def _slow(
        self, device: _Device, tag: str, ts: np.ndarray, values: np.ndarray, window: Window
    ) -> _Features:
        feats = self._finite(device, tag, slow_features(ts, values))
        if tag in device.complete:
            defs = _ANNOUNCED
        else:
            unit = device.units.get(tag, "")
            defs = {
                f"{tag}.{k}": (
                    unit + SLOW_UNITS[k][0] if k == "slope_per_min" else unit,
                    f"{SLOW_UNITS[k][1]} of {tag}",
                )
                for k in feats
            }
        return _Features(feats, tag, defs, window, int(ts[0]), int(ts[-1]))

    def _finite(self, device: _Device, signal: str, feats: dict[str, float]) -> dict[str, float]:
        """Only finite features go out (JSON has no inf: it would arrive as null); values
        so large that their statistics overflow are counted, not published."""
        kept = {k: v for k, v in feats.items() if math.isfinite(v)}
        if len(kept) != len(feats):
            bad = sorted(set(feats) - set(kept))
            self._exclude("overflow", f"{device.path} {signal}: {', '.join(bad)} not finite")
        return kept

    async def _announce(self, device: _Device, results: list[_Features]) -> None:
        """Features never announced before go into one new birth (a birth is two QoS 1
        round trips that hold up the outbox)."""
        new = {
            name: MetricDef(
                name=name,
                datatype="double",
                unit=unit,
                description=desc,
                source=f"featurizer:{r.signal}",
            )
            for r in results
            if r.defs is not _ANNOUNCED
            for name, (unit, desc) in r.defs.items()
            if name not in device.announced
        }
        if new:
            device.announced.update(new)
            await self.node.device_birth(device.path, "features", list(device.announced.values()))

    async def _publish_slow(self, device: _Device, results: list[_Features]) -> None:
        """One message for the slow-tag windows of one window end: every tag's features,
        ``window`` over all of them (counts summed, the first and last source messages of
        all), ``signals`` with each tag's own counts and source messages."""
        results = [r for r in results if r.feats]
        if not results:
            return
        await self._announce(device, results)
        for r in results:
            if r.defs is not _ANNOUNCED and all(
                f"{r.signal}.{k}" in device.announced for k in SLOW_UNITS
            ):
                device.complete.add(r.signal)
        first = min(results, key=lambda r: r.first_ts).window
        latest = max(r.last_ts for r in results)  # of tags sampled together: the last taken
        last = [r for r in results if r.last_ts == latest][-1].window
        w = results[0].window
        window = Window(
            start=w.start,
            end=w.end,
            good=sum(r.window.good for r in results),
            total=sum(r.window.total for r in results),
            seq_first=first.seq_first,
            seq_last=last.seq_last,
            node=w.node,
        )
        signals = {
            r.signal: SignalWindow(
                good=r.window.good,
                total=r.window.total,
                seq_first=r.window.seq_first,
                seq_last=r.window.seq_last,
            )
            for r in results
        }
        metrics = [
            Metric(name=f"{r.signal}.{k}", value=round(v, 9))
            for r in results
            for k, v in r.feats.items()
        ]
        await self.node.device_data(
            device.path, "features", metrics, window=window, signals=signals
        )
        self.windows.labels("slow").inc(len(results))

    async def _publish_all(self, device: _Device, results: list[_Features], kind: str) -> None:
        """One features message per window (the waveform windows)."""
        results = [r for r in results if r.feats]
        await self._announce(device, results)
        for r in results:
            metrics = [
                Metric(name=f"{r.signal}.{k}", value=round(v, 9)) for k, v in r.feats.items()
            ]
            await self.node.device_data(device.path, "features", metrics, window=r.window)
            self.windows.labels(kind).inc()


_ANNOUNCED: Final[dict[str, tuple[str, str]]] = {}
"""The definitions of a slow tag whose every feature is announced (never written to)."""


@dataclass(frozen=True)
class _Features:
    """The features of one window of one signal, with their units and descriptions."""

    feats: dict[str, float]
    signal: str
    defs: dict[str, tuple[str, str]]
    window: Window
    first_ts: int = 0
    last_ts: int = 0
    """Data time of the first and last sample (slow tags)."""


def _scaled_unit(base: str, signal_unit: str) -> str:
    """``g`` features take the signal's unit (e.g. mm/s); energies its square."""
    if not signal_unit or signal_unit == "g":
        return base
    return {"g": signal_unit, "g2": f"({signal_unit})2"}.get(base, base)
