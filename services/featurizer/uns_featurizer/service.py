from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from uns import (
    DeviceBirth,
    DeviceData,
    DevicePath,
    Inbound,
    Metric,
    MetricDef,
    Node,
    Service,
    Waveform,
    Window,
)
from uns.topics import device_filter
from uns_featurizer.features import (
    SLOW_UNITS,
    WAVEFORM_UNITS,
    BearingGeometry,
    slow_features,
    waveform_features,
)
from uns_featurizer.settings import FeaturizerSettings
from uns_featurizer.windows import SlowWindow, WaveformWindow

log = logging.getLogger(__name__)


@dataclass
class _Device:
    path: DevicePath
    units: dict[str, str] = field(default_factory=dict)
    waveforms: set[str] = field(default_factory=set)
    wave: dict[str, WaveformWindow] = field(default_factory=dict)
    slow: dict[str, SlowWindow] = field(default_factory=dict)
    speed_rpm: float | None = None
    announced: dict[str, MetricDef] = field(default_factory=dict)
    phase_ms: int = 0
    """Where in the hop this device's slow windows end (the same for all its tags)."""


class Featurizer(Service[FeaturizerSettings]):
    """Raw data in, features out, per device.

    Subscribes to ``+/+/+/+/+/+/raw/birth`` (units, which metrics are waveforms) and
    ``+/+/+/+/+/+/raw/data``; publishes ``{device}/features/birth`` and
    ``{device}/features/data`` (one message per window, with its provenance).
    """

    name = "featurizer"
    Settings = FeaturizerSettings
    default_metrics_port = 9405

    def __init__(self, node: Node[FeaturizerSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.devices: dict[DevicePath, _Device] = {}
        self.assets = {d.path: d.asset for d in node.config.plant.devices}
        node.subscribe(device_filter(stream="raw", message="birth"), DeviceBirth, self.on_birth)
        node.subscribe(device_filter(stream="raw", message="data"), DeviceData, self.on_data)
        r, svc = node.metrics.registry, node.service
        self.windows = Counter(
            "uns_featurizer_windows_total",
            "Windows turned into features",
            ["service", "kind"],
            registry=r,
        )
        self.excluded = Counter(
            "uns_featurizer_samples_excluded_total",
            "Samples kept out of features, by reason",
            ["service", "reason"],
            registry=r,
        )
        self.compute = Histogram(
            "uns_featurizer_compute_seconds",
            "Time to compute one window's features",
            ["service", "kind"],
            registry=r,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1),
        )
        for kind in ("waveform", "slow"):
            self.windows.labels(svc, kind)
        self._wave_hop = s.waveform.hop or s.waveform.window
        self._slow_ms = int(s.slow.window_s * 1000), int(s.slow.hop_s * 1000)

    def _device(self, topic: str) -> _Device:
        path = DevicePath.parse(topic.rsplit("/", 2)[0])
        device = self.devices.get(path)
        if device is None:
            hop_ms = self._slow_ms[1]
            phase = zlib.crc32(str(path).encode()) % hop_ms if self.settings.slow.stagger else 0
            device = self.devices[path] = _Device(path, phase_ms=phase)
        return device

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        device = self._device(msg.topic)
        for m in msg.payload.metrics:
            device.units[m.name] = m.unit
            if m.datatype == "waveform":
                device.waveforms.add(m.name)

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        device = self._device(msg.topic)
        data = msg.payload
        s = self.settings
        slow: list[_Features] = []
        for m in data.metrics:
            value, good = m.value, m.quality == "good"
            if m.name in s.speed_tags and good and isinstance(value, (int, float)):
                device.speed_rpm = float(value)
            if isinstance(value, Waveform):
                window = device.wave.get(m.name)
                if window is None:
                    window = device.wave[m.name] = WaveformWindow(s.waveform.window, self._wave_hop)
                for samples, rate, prov in window.add(
                    value,
                    seq=data.seq,
                    node=data.node,
                    good=good,
                ):
                    await self._waveform(device, m.name, samples, rate, prov)
                self._count(window.excluded.counts)
            elif m.name not in s.ignore and (
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            ):
                window_s = device.slow.get(m.name)
                if window_s is None:
                    window_s = device.slow[m.name] = SlowWindow(*self._slow_ms, device.phase_ms)
                ts = m.ts if m.ts is not None else data.ts
                for ts_arr, values, prov in window_s.add(
                    ts,
                    value,
                    good=good,
                    seq=data.seq,
                    node=data.node,
                ):
                    slow.append(self._slow(device, m.name, ts_arr, values, prov))
                self._count(window_s.excluded.counts)
        if slow:  # the tags of a message close their windows together: one birth for all
            await self._publish_all(device, slow, "slow")

    def _count(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.excluded.labels(self.node.service, reason).inc(n)
        counts.clear()

    async def _waveform(
        self, device: _Device, signal: str, samples: np.ndarray, rate: float, window: Window
    ) -> None:
        s = self.settings
        shaft_hz = device.speed_rpm / 60.0 if device.speed_rpm else None
        b = s.bearings.get(self.assets.get(str(device.path), ""), s.bearing)
        geometry = BearingGeometry(b.balls, b.ball_mm, b.pitch_mm, b.contact_deg)
        started = time.perf_counter()
        feats = await asyncio.to_thread(
            waveform_features,
            samples,
            rate,
            bands=tuple(s.waveform.bands),
            shaft_hz=shaft_hz,
            bearing=geometry,
            envelope_band=s.waveform.envelope_band,
        )
        self.compute.labels(self.node.service, "waveform").observe(time.perf_counter() - started)
        unit = device.units.get(signal, "")
        defs = {}
        for name in feats:
            base_unit, description = WAVEFORM_UNITS.get(name, ("g2", "Energy in the band"))
            if name.startswith("band_"):
                description = f"Energy between {name[5:].replace('_', ' and ')} Hz"
            defs[f"{signal}.{name}"] = (_scaled_unit(base_unit, unit), description)
        await self._publish_all(device, [_Features(feats, signal, defs, window)], "waveform")

    def _slow(
        self, device: _Device, tag: str, ts: np.ndarray, values: np.ndarray, window: Window
    ) -> _Features:
        feats = slow_features(ts, values)
        unit = device.units.get(tag, "")
        defs = {
            f"{tag}.{k}": (
                unit + SLOW_UNITS[k][0] if k == "slope_per_min" else unit,
                f"{SLOW_UNITS[k][1]} of {tag}",
            )
            for k in feats
        }
        return _Features(feats, tag, defs, window)

    async def _publish_all(self, device: _Device, results: list[_Features], kind: str) -> None:
        """One features message per window; features never announced before go into one
        new birth first (a birth is two QoS 1 round trips that hold up the outbox)."""
        results = [r for r in results if r.feats]
        new = {
            name: MetricDef(
                name=name,
                datatype="double",
                unit=unit,
                description=desc,
                source=f"featurizer:{r.signal}",
            )
            for r in results
            for name, (unit, desc) in r.defs.items()
            if name not in device.announced
        }
        if new:
            device.announced.update(new)
            await self.node.device_birth(device.path, "features", list(device.announced.values()))
        for r in results:
            metrics = [
                Metric(name=f"{r.signal}.{k}", value=round(v, 9)) for k, v in r.feats.items()
            ]
            await self.node.device_data(
                device.path,
                "features",
                metrics,
                ts=r.window.end,
                window=r.window,
            )
            self.windows.labels(self.node.service, kind).inc()


@dataclass(frozen=True)
class _Features:
    """The features of one window of one signal, with their units and descriptions."""

    feats: dict[str, float]
    signal: str
    defs: dict[str, tuple[str, str]]
    window: Window


def _scaled_unit(base: str, signal_unit: str) -> str:
    """``g`` features take the signal's unit (e.g. mm/s); energies its square."""
    if not signal_unit or signal_unit == "g":
        return base
    return {"g": signal_unit, "g2": f"({signal_unit})2"}.get(base, base)
