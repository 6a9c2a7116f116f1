"""The north side's state: the namespace's devices as Sparkplug devices, and the payloads
that describe them (pure logic: no I/O, so births and data are testable without a broker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from uns import payloads as p
from uns.topics import DevicePath
from uns_sparkplug import codec

EVENT_FIELDS: Final = (
    ("state", codec.STRING),
    ("severity", codec.STRING),
    ("score", codec.DOUBLE),
    ("summary", codec.STRING),
)
"""An event kind's metrics: ``events/{kind}/{field}``."""


@dataclass(slots=True)
class Value:
    value: Any = None
    ts: int | None = None
    quality: str = "good"
    reason: str | None = None


@dataclass(slots=True)
class MetricInfo:
    name: str
    """``{stream}/{metric}``: the Sparkplug metric name."""
    datatype: int
    alias: int
    unit: str = ""
    low: float | None = None
    high: float | None = None
    description: str = ""
    current: Value = field(default_factory=Value)
    sent_quality: str = "good"


@dataclass(slots=True)
class Device:
    path: DevicePath
    id: str
    metrics: dict[str, MetricInfo] = field(default_factory=dict)
    streams: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Live streams: stream -> (node, bdseq) of the namespace birth."""
    born: bool = False
    """Its DBIRTH went out in this Sparkplug session."""
    dirty: bool = True
    """Its metrics changed since the last DBIRTH: the next message is a DBIRTH."""


Update = tuple[str, Value]


class Mirror:
    """The mirrored devices, their metrics (with aliases, unique across the edge node) and
    last values. The namespace handlers update it; the sender reads it."""

    def __init__(self, *, waveforms: bool = False) -> None:
        self.waveforms = waveforms
        self.devices: dict[DevicePath, Device] = {}
        self._aliases: dict[tuple[str, str], int] = {}
        self.next_alias = 2  # 0: bdSeq, 1: Node Control/Rebirth
        self.unknown = 0
        """Data of a metric no birth declared (dropped)."""

    def device(self, path: DevicePath) -> Device:
        dev = self.devices.get(path)
        if dev is None:
            dev = self.devices[path] = Device(path, codec.device_id(path))
        return dev

    def _alias(self, device: str, name: str) -> int:
        key = (device, name)
        alias = self._aliases.get(key)
        if alias is None:
            alias = self._aliases[key] = self.next_alias
            self.next_alias += 1
        return alias

    def _define(self, dev: Device, name: str, datatype: int, **meta: Any) -> bool:
        """Declare a metric; True if the device's birth changes by it."""
        old = dev.metrics.get(name)
        if old is not None and old.datatype == datatype:
            changed = (old.unit, old.low, old.high) != (
                meta.get("unit", ""),
                meta.get("low"),
                meta.get("high"),
            )
            old.unit, old.low, old.high = meta.get("unit", ""), meta.get("low"), meta.get("high")
            old.description = meta.get("description", "")
            return changed
        dev.metrics[name] = MetricInfo(name, datatype, self._alias(dev.id, name), **meta)
        return True

    # ---- what the namespace says -------------------------------------------------------

    def birth(self, path: DevicePath, stream: str, birth: p.DeviceBirth) -> bool:
        """A namespace device birth; True if the Sparkplug device must be born again."""
        dev = self.device(path)
        changed = stream not in dev.streams
        dev.streams[stream] = (birth.node, birth.bdseq)
        names = set()
        for d in birth.metrics:
            if d.datatype == "waveform" and not self.waveforms:
                continue
            name = f"{stream}/{d.name}"
            names.add(name)
            changed |= self._define(
                dev,
                name,
                codec.TO_SPARKPLUG[d.datatype],
                unit=d.unit,
                low=d.low,
                high=d.high,
                description=d.description,
            )
        for name in [n for n in dev.metrics if n.startswith(f"{stream}/") and n not in names]:
            del dev.metrics[name]  # a metric the stream no longer has
            changed = True
        if changed:
            dev.dirty = True
        return changed

    def data(self, path: DevicePath, stream: str, data: p.DeviceData) -> list[Update]:
        dev = self.devices.get(path)
        if dev is None:
            self.unknown += len(data.metrics)
            return []
        out: list[Update] = []
        for m in data.metrics:
            info = dev.metrics.get(f"{stream}/{m.name}")
            if info is None:
                if not (isinstance(m.value, p.Waveform) and not self.waveforms):
                    self.unknown += 1
                continue
            value: Any = m.value
            ts = m.ts
            if isinstance(m.value, p.Waveform):
                value = m.value.values()
                ts = m.ts if m.ts is not None else m.value.t0_us // 1000
            info.current = Value(value, ts or data.ts, m.quality, m.reason)
            out.append((info.name, info.current))
        return out

    def event(self, path: DevicePath, kind: str, event: p.Event) -> tuple[bool, list[Update]]:
        """An event; (whether the device is born again for a new kind, the updates)."""
        dev = self.device(path)
        changed = False
        values = {
            "state": event.state,
            "severity": event.severity,
            "score": event.score,
            "summary": event.summary,
        }
        out: list[Update] = []
        for fname, datatype in EVENT_FIELDS:
            name = f"events/{kind}/{fname}"
            changed |= self._define(dev, name, datatype)
            info = dev.metrics[name]
            info.current = Value(values[fname], event.ts)
            out.append((name, info.current))
        if changed:
            dev.dirty = True
        return changed, out

    def death(self, path: DevicePath, stream: str, reason: str) -> tuple[bool, list[Update]]:
        """A stream died: its metrics go bad (values kept); (whether the whole device is
        gone now, the updates)."""
        dev = self.devices.get(path)
        if dev is None or dev.streams.pop(stream, None) is None:
            return False, []
        out: list[Update] = []
        for info in dev.metrics.values():
            if info.name.startswith(f"{stream}/"):
                info.current = Value(info.current.value, None, "bad", reason or f"{stream} death")
                out.append((info.name, info.current))
        return not dev.streams, out

    def node_death(self, node: str, bdseq: int) -> list[tuple[DevicePath, str]]:
        """The streams a namespace node's death takes with it."""
        return [
            (path, stream)
            for path, dev in self.devices.items()
            for stream, (born_by, born_bdseq) in dev.streams.items()
            if born_by == node and born_bdseq == bdseq
        ]

    # ---- payloads ----------------------------------------------------------------------

    def node_birth(self, bdseq: int, ts: int) -> bytes:
        payload = codec.new_payload(ts, 0)
        m = payload.metrics.add()
        m.name, m.alias, m.timestamp, m.datatype, m.long_value = (
            codec.BDSEQ,
            0,
            ts,
            codec.INT64,
            bdseq,
        )
        m = payload.metrics.add()
        m.name, m.alias, m.timestamp, m.datatype, m.boolean_value = (
            codec.REBIRTH,
            1,
            ts,
            codec.BOOLEAN,
            False,
        )
        return bytes(payload.SerializeToString())

    def device_birth(self, dev: Device, seq: int, ts: int) -> bytes:
        payload = codec.new_payload(ts, seq)
        for info in dev.metrics.values():
            m = payload.metrics.add()
            m.name = info.name
            m.alias = info.alias
            m.datatype = info.datatype
            m.timestamp = info.current.ts or ts
            _value(m, info, info.current)
            if info.unit:
                codec.add_property(m, "engUnit", info.unit)
            if info.low is not None:
                codec.add_property(m, "engLow", info.low)
            if info.high is not None:
                codec.add_property(m, "engHigh", info.high)
            if info.description:
                codec.add_property(m, "description", info.description)
            _quality(m, info.current)
            info.sent_quality = info.current.quality
        return bytes(payload.SerializeToString())

    def device_data(self, dev: Device, updates: list[Update], seq: int, ts: int) -> bytes:
        payload = codec.new_payload(ts, seq)
        for name, value in updates:
            info = dev.metrics.get(name)
            if info is None:
                continue
            m = payload.metrics.add()
            m.alias = info.alias
            m.timestamp = value.ts or ts
            _value(m, info, value)
            if value.quality != "good" or info.sent_quality != "good":
                _quality(m, value)  # said while bad, and once when good again
                info.sent_quality = value.quality
        return bytes(payload.SerializeToString())

    @staticmethod
    def device_death(seq: int, ts: int) -> bytes:
        return bytes(codec.new_payload(ts, seq).SerializeToString())


def _value(m: Any, info: MetricInfo, value: Value) -> None:
    try:
        codec.set_value(m, info.datatype, value.value)
    except (codec.SparkplugError, TypeError, ValueError):
        m.is_null = True  # a value its birth's datatype cannot carry


def _quality(m: Any, value: Value) -> None:
    codec.add_property(m, codec.QUALITY, codec.QUALITY_CODES.get(value.quality, 0))
    if value.quality != "good" and value.reason:
        codec.add_property(m, codec.QUALITY_REASON, value.reason)
