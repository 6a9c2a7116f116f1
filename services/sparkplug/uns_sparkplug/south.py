"""``uns run sparkplug-adapter``: Sparkplug B edge nodes into the namespace.

A host application (with ``host_id``: the primary host, its STATE retained at
``spBv1.0/STATE/{host_id}``, its will saying offline) or a plain subscriber on a broker
carrying ``spBv1.0``. Each device of an edge node becomes a namespace device whose
``raw`` stream is born from its DBIRTH (names, datatypes, units from ``engUnit``, range
from ``engLow``/``engHigh``) and carries its DDATA (aliases resolved, source timestamps,
quality from the ``Quality`` property, a null value as bad quality). DDEATH, and an NDEATH
whose bdSeq matches the NBIRTH's, are the devices' deaths. A seq gap, data before any
NBIRTH, or an alias no birth declared: the edge node is asked for a rebirth (NCMD
``Node Control/Rebirth``, at most one per ``rebirth_request_interval_s``) and its data is
dropped (counted) until the NBIRTH.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from uns import DevicePath, Metric, MetricDef, Node, Service, Throttled, now_ms
from uns.bus import Bus, Will, connect
from uns.config import redact_url
from uns.errors import BusError, ConfigError
from uns_sparkplug import codec
from uns_sparkplug.settings import SparkplugAdapterSettings

log = logging.getLogger(__name__)

DROP_REASONS: Final = (
    "decode",
    "datatype",
    "seq_gap",
    "no_birth",
    "unknown_alias",
    "stale_death",
    "value",
)


@dataclass(slots=True)
class _Known:
    device: str | None
    name: str
    datatype: int


@dataclass(slots=True)
class _Edge:
    bdseq: int | None = None
    seq: int = 0
    born: bool = False
    aliases: dict[int, _Known] = field(default_factory=dict)
    names: dict[tuple[str | None, str], _Known] = field(default_factory=dict)
    devices: dict[str, DevicePath] = field(default_factory=dict)
    asked: float = -float("inf")
    """monotonic time of the last rebirth request"""


class SparkplugAdapter(Service[SparkplugAdapterSettings]):
    """Sparkplug edge nodes -> the namespace's raw streams."""

    name = "sparkplug-adapter"
    Settings = SparkplugAdapterSettings

    def __init__(self, node: Node[SparkplugAdapterSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.edges: dict[tuple[str, str], _Edge] = {}
        self.values = 0
        """Values published into the namespace so far."""
        self.changed = asyncio.Event()
        self._throttled = Throttled(logger=log)
        m = node.metrics
        self.m_messages = m.counter(
            "uns_sparkplug_adapter_messages_total",
            "Sparkplug messages taken, by type",
            ["type"],
            zeros=("NBIRTH", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "NDATA"),
        )
        self.m_dropped = m.counter(
            "uns_sparkplug_adapter_dropped_total",
            "Sparkplug messages or metrics not taken, by reason",
            ["reason"],
            zeros=DROP_REASONS,
        )
        self.m_rebirths = m.counter(
            "uns_sparkplug_adapter_rebirth_requests_total",
            "Rebirth requests (NCMD) sent to edge nodes",
        ).labels()
        self.m_values = m.counter(
            "uns_sparkplug_adapter_values_total", "Values published into the namespace"
        ).labels()
        b = s.broker  # absent: the namespace's own broker, and its fallbacks (broker.urls)
        self.urls = node.broker_urls if b is None else [b.url]
        self._at = 0
        """The broker in use (or tried next) in ``urls``: a failed session tries the next."""
        self.broker_settings = node.broker if b is None else b.settings()

    def path_of(self, group: str, edge: str, device: str) -> DevicePath:
        """The namespace device of a Sparkplug device (README, "Sparkplug B")."""
        n = self.node
        path = codec.device_path(n.enterprise, n.site, device)
        if path is not None:
            return path
        return DevicePath(
            n.enterprise,
            n.site,
            self.settings.area,
            codec.slug(group),
            codec.slug(edge),
            codec.slug(device),
        )

    @property
    def url(self) -> str:
        return self.urls[self._at]

    # ---- the session -----------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._session()
                error = "the broker closed the connection"
            except BusError as exc:
                error = str(exc)
            except ConfigError as exc:
                error = str(exc)
            self.edges.clear()  # a new session: every edge node is born again to us
            if time.monotonic() - started > 30:
                attempt = 0
            delay = min(s.reconnect_max_s, s.reconnect_min_s * 2**attempt)
            attempt += 1
            self._at = (self._at + 1) % len(self.urls)
            then = f" on {redact_url(self.url)}" if len(self.urls) > 1 else ""
            log.warning("%s: Sparkplug: %s; retrying in %.1f s%s", self.node.id, error, delay, then)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        s = self.settings
        ts = now_ms()
        will = None
        if s.host_id:
            will = Will(codec.state_topic(s.host_id), codec.encode_state(False, ts), qos=1)
        async with connect(
            self.url,
            client_id=f"uns-spb-host-{s.host_id or self.node.id}"[:128],
            will=will,
            settings=self.broker_settings,
        ) as bus:
            for group in s.groups or ["+"]:
                await bus.subscribe(f"{codec.NAMESPACE}/{group}/#", qos=1)
            if s.host_id:  # 3.0: subscribed first, then online (retained, QoS 1)
                await bus.publish(
                    codec.state_topic(s.host_id),
                    codec.encode_state(True, ts),
                    qos=1,
                    retain=True,
                )
            log.info("%s: Sparkplug host on %s", self.node.id, self.url)
            self.changed.set()
            try:
                async for message in bus.messages():
                    await self._take(bus, message.topic, message.payload)
            except asyncio.CancelledError:
                if s.host_id:  # a clean stop: the will is not sent, say it
                    await asyncio.shield(self._offline(bus, ts))
                raise
        raise BusError("the Sparkplug connection ended")

    async def _offline(self, bus: Bus, ts: int) -> None:
        assert self.settings.host_id
        try:
            await bus.publish(
                codec.state_topic(self.settings.host_id),
                codec.encode_state(False, ts),
                qos=1,
                retain=True,
            )
        except BusError:
            pass

    # ---- messages --------------------------------------------------------------------

    def _drop(self, reason: str, what: str, n: int = 1) -> None:
        self.m_dropped.labels(reason).inc(n)
        self._throttled.warning(reason, "%s: dropped %s (%s)", self.node.id, what, reason)

    async def _take(self, bus: Bus, topic: str, data: bytes) -> None:
        try:
            t = codec.parse_topic(topic)
        except codec.SparkplugError:
            return  # STATE, or not Sparkplug B
        if t.message in ("NCMD", "DCMD"):
            return  # commands to edge nodes, ours or another host's
        try:
            payload = codec.decode_payload(data)
        except codec.SparkplugError as exc:
            self._drop("decode", f"{topic[:200]}: {exc}")
            return
        key = (t.group, t.edge)
        edge = self.edges.get(key)
        self.m_messages.labels(t.message).inc()
        if t.message == "NBIRTH":
            edge = self.edges[key] = _Edge(
                bdseq=codec.bdseq_of(payload), seq=payload.seq, born=True
            )
            self._learn(edge, None, payload)
            return
        if t.message == "NDEATH":
            if edge is None:
                return
            bdseq = codec.bdseq_of(payload)
            if bdseq is not None and edge.bdseq is not None and bdseq != edge.bdseq:
                self._drop("stale_death", f"NDEATH bdSeq {bdseq} of {t.edge} (born {edge.bdseq})")
                return
            for path in edge.devices.values():
                await self.node.device_death(path, "raw", f"NDEATH of {t.group}/{t.edge}")
            del self.edges[key]
            self.changed.set()
            return
        if edge is None or not edge.born:
            self._drop("no_birth", f"{t.message} of {t.group}/{t.edge} before its NBIRTH")
            await self._ask_rebirth(bus, key)
            return
        expected = (edge.seq + 1) % codec.SEQ_MODULUS
        if not payload.HasField("seq") or payload.seq != expected:
            got = payload.seq if payload.HasField("seq") else None
            self._drop("seq_gap", f"{t.message} of {t.group}/{t.edge}: seq {got}, {expected} due")
            edge.born = False  # nothing until the NBIRTH
            await self._ask_rebirth(bus, key)
            return
        edge.seq = payload.seq
        if t.message == "NDATA" or t.device is None:
            return  # the edge node's own metrics are not a device
        if t.message == "DBIRTH":
            await self._device_birth(edge, t, payload)
        elif t.message == "DDATA":
            await self._device_data(bus, key, edge, t, payload)
        elif t.message == "DDEATH":
            gone = edge.devices.pop(t.device, None)
            if gone is not None:
                await self.node.device_death(gone, "raw", f"DDEATH of {t.group}/{t.edge}")
        self.changed.set()

    def _learn(self, edge: _Edge, device: str | None, payload: Any) -> list[_Known]:
        known = []
        for m in payload.metrics:
            if not m.name:
                continue
            k = _Known(device, m.name, m.datatype)
            edge.names[(device, m.name)] = k
            if m.HasField("alias"):
                edge.aliases[m.alias] = k
            known.append(k)
        return known

    async def _device_birth(self, edge: _Edge, t: codec.Topic, payload: Any) -> None:
        assert t.device is not None
        path = self.path_of(t.group, t.edge, t.device)
        for k in [k for k, v in edge.aliases.items() if v.device == t.device]:
            del edge.aliases[k]
        for k2 in [k for k in edge.names if k[0] == t.device]:
            del edge.names[k2]
        self._learn(edge, t.device, payload)
        defs: list[MetricDef] = []
        for m in payload.metrics:
            datatype = codec.FROM_SPARKPLUG.get(m.datatype)
            if datatype is None or not m.name:
                self._drop("datatype", f"{t.device}/{m.name}: datatype {m.datatype}")
                continue
            props = codec.properties(m)
            unit = props.get("engUnit")
            low, high = props.get("engLow"), props.get("engHigh")
            defs.append(
                MetricDef(
                    name=m.name,
                    datatype=datatype,  # type: ignore[arg-type]
                    unit=unit if isinstance(unit, str) else "",
                    low=float(low) if isinstance(low, (int, float)) else None,
                    high=float(high) if isinstance(high, (int, float)) else None,
                    description=str(props.get("description", "")),
                    source=f"spBv1.0/{t.group}/{t.edge}/{t.device}",
                )
            )
        edge.devices[t.device] = path
        await self.node.device_birth(path, "raw", defs)
        values = self._values(t, payload, birth=True)
        if values:
            await self._publish(path, values, payload)

    async def _device_data(
        self, bus: Bus, key: tuple[str, str], edge: _Edge, t: codec.Topic, payload: Any
    ) -> None:
        assert t.device is not None
        path = edge.devices.get(t.device)
        if path is None:
            self._drop("no_birth", f"DDATA of {t.device} before its DBIRTH")
            edge.born = False
            await self._ask_rebirth(bus, key)
            return
        resolved = []
        for m in payload.metrics:
            k = (
                edge.names.get((t.device, m.name))
                if m.name
                else edge.aliases.get(m.alias)
                if m.HasField("alias")
                else None
            )
            if k is None or k.device != t.device:
                self._drop("unknown_alias", f"DDATA of {t.device}: alias {m.alias} / {m.name!r}")
                edge.born = False
                await self._ask_rebirth(bus, key)
                return
            resolved.append((k, m))
        values = self._values(t, payload, known=resolved)
        if values:
            await self._publish(path, values, payload)

    def _values(
        self,
        t: codec.Topic,
        payload: Any,
        *,
        birth: bool = False,
        known: list[tuple[_Known, Any]] | None = None,
    ) -> list[Metric]:
        pairs = known if known is not None else [(None, m) for m in payload.metrics]
        out: list[Metric] = []
        for k, m in pairs:
            name = k.name if k is not None else m.name
            datatype = k.datatype if k is not None else m.datatype
            if codec.FROM_SPARKPLUG.get(datatype) is None:
                continue  # counted at the birth
            if birth and m.WhichOneof("value") is None and not m.is_null:
                continue  # a birth without a value
            try:
                value = codec.get_value(m, datatype)
            except codec.SparkplugError as exc:
                self._drop("value", f"{t.device}/{name}: {exc}")
                continue
            props = codec.properties(m)
            quality = codec.quality_of(props.get(codec.QUALITY))
            reason = props.get(codec.QUALITY_REASON)
            if value is None and quality == "good":
                quality, reason = "bad", "null"
            out.append(
                Metric(
                    name=name,
                    value=value,
                    ts=m.timestamp if m.HasField("timestamp") else None,
                    quality=quality,  # type: ignore[arg-type]
                    reason=str(reason) if reason is not None and quality != "good" else None,
                )
            )
        return out

    async def _publish(self, path: DevicePath, values: list[Metric], payload: Any) -> None:
        ts = payload.timestamp if payload.HasField("timestamp") else None
        await self.node.device_data(path, "raw", values, ts=ts or None)
        self.values += len(values)
        self.m_values.inc(len(values))

    async def _ask_rebirth(self, bus: Bus, key: tuple[str, str]) -> None:
        edge = self.edges.setdefault(key, _Edge())
        now = time.monotonic()
        if now - edge.asked < self.settings.rebirth_request_interval_s:
            return
        edge.asked = now
        group, edge_id = key
        log.info("%s: asking %s/%s for a rebirth", self.node.id, group, edge_id)
        await bus.publish(
            codec.topic(group, "NCMD", edge_id), codec.rebirth_request(now_ms()), qos=0
        )
        self.m_rebirths.inc()
