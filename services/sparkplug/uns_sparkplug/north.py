"""``uns run sparkplug``: the namespace as one Sparkplug B 3.0 edge node.

The namespace comes in through the `Node` (subscriptions to the mirrored streams); the
Sparkplug side is a second MQTT connection of its own, whose will is the NDEATH with the
session's ``bdSeq``. One sender task owns that connection and the ``seq`` counter, so
NBIRTH, DBIRTH, DDATA and DDEATH go out in one sequence (0..255, wrapping; NBIRTH is 0).

A session: connect (will: NDEATH bdSeq=n), subscribe to our NCMD and DCMD (and the
primary host's STATE), wait for the primary host to be online if one is configured, then
NBIRTH (bdSeq=n, ``Node Control/Rebirth``), a DBIRTH per device with every metric, its
datatype, alias and current value, and DDATA (aliases only) as the namespace changes.
NCMD ``Node Control/Rebirth`` = true: NBIRTH and every DBIRTH again. The primary host
going offline: NDEATH, disconnect, start over with bdSeq n+1. DCMD (a write) is refused,
logged at most once per ``cmd_log_interval_s`` and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Final

from uns import DevicePath, Inbound, Node, Service, Throttled, now_ms
from uns import payloads as p
from uns.bus import Bus, Will, connect
from uns.config import redact_url
from uns.errors import BusError, ConfigError
from uns.topics import DeviceTopic, parse
from uns_sparkplug import codec
from uns_sparkplug.mirror import Mirror, Update
from uns_sparkplug.settings import SparkplugSettings

log = logging.getLogger(__name__)

_BIRTH: Final = "birth"


class _StartOver(Exception):
    """The primary host went offline: NDEATH, disconnect, start over."""


class SparkplugNode(Service[SparkplugSettings]):
    """The north edge node: mirrors the namespace's streams as Sparkplug metrics."""

    name = "sparkplug"
    Settings = SparkplugSettings

    def __init__(self, node: Node[SparkplugSettings]) -> None:
        super().__init__(node)
        s = self.settings
        config = node.config
        self.group, self.edge = s.ids(config)
        self.mirror = Mirror(waveforms=s.waveforms)
        self._queue: collections.deque[tuple[str, DevicePath, list[Update]]] = collections.deque()
        self._ready = asyncio.Event()
        self._online = False  # a Sparkplug session with its NBIRTH out
        self._rebirth = False
        self.seq = 0
        self.bdseq = 0
        self.sessions = 0
        self.writes_refused = 0
        self.changed = asyncio.Event()
        """Set when a session starts or ends (for tests)."""
        self._throttled = Throttled(s.cmd_log_interval_s, logger=log)
        m = node.metrics
        self.m_published = m.counter(
            "uns_sparkplug_messages_total",
            "Sparkplug messages published, by type (NBIRTH, DBIRTH, DDATA, DDEATH, NDEATH)",
            ["type"],
            zeros=("NBIRTH", "DBIRTH", "DDATA", "DDEATH", "NDEATH"),
        )
        self.m_refused = m.counter(
            "uns_sparkplug_writes_refused_total",
            "DCMD/NCMD writes refused (the OT side is read-only), by reason",
            ["reason"],
            zeros=("read_only", "decode", "unknown_metric", "type", "out_of_range"),
        )
        self.m_forwarded = m.counter(
            "uns_sparkplug_writes_forwarded_total",
            "DCMD writes to a writable tag forwarded to its device as a cmd/write",
        ).labels()
        self.writes_forwarded = 0
        self._writable = set(s.writable)
        self.m_rebirths = m.counter(
            "uns_sparkplug_rebirths_total", "Rebirths on NCMD Node Control/Rebirth"
        ).labels()
        self.m_dropped = m.counter(
            "uns_sparkplug_dropped_total",
            "Namespace updates not mirrored, by reason (offline: no Sparkplug session;"
            " queue: the sender fell behind; unknown: data of a metric no birth declared)",
            ["reason"],
            zeros=("offline", "queue", "unknown"),
        )
        self.m_connected = m.gauge(
            "uns_sparkplug_connected", "1 while the edge node is born (NBIRTH sent)"
        ).labels()
        self.m_connected.set(0)
        self.m_devices = m.gauge("uns_sparkplug_devices", "Devices mirrored").labels()
        self.m_devices.set_function(lambda: len(self.mirror.devices))
        for topic_filter in s.filters(config):
            node.subscribe(topic_filter, p.Payload, self._on_namespace, qos=1)
        node.subscribe(s.node_deaths(config), p.NodeDeath, self._on_node_death)
        b = s.broker  # absent: the namespace's own broker, and its fallbacks (broker.urls)
        self.urls = node.broker_urls if b is None else [b.url]
        self._at = 0
        """The broker in use (or tried next) in ``urls``: a failed session tries the next."""
        self.broker_settings = node.broker if b is None else b.settings()

    @property
    def url(self) -> str:
        return self.urls[self._at]

    # ---- the namespace side --------------------------------------------------------------

    async def _on_namespace(self, msg: Inbound[Any]) -> None:
        t = parse(msg.topic)
        if not isinstance(t, DeviceTopic):
            return
        payload = msg.payload
        path, stream = t.path, t.stream
        if isinstance(payload, p.DeviceBirth):
            if self.mirror.birth(path, stream, payload):
                self._put("birth", path, [])
        elif isinstance(payload, p.DeviceData):
            before = self.mirror.unknown
            updates = self.mirror.data(path, stream, payload)
            if self.mirror.unknown > before:
                self.m_dropped.labels("unknown").inc(self.mirror.unknown - before)
            if updates:
                self._put("data", path, updates)
        elif isinstance(payload, p.DeviceDeath):
            gone, updates = self.mirror.death(path, stream, payload.reason)
            self._put("death" if gone else "data", path, updates)
        elif isinstance(payload, p.Event):
            _, updates = self.mirror.event(path, t.message, payload)
            self._put("data", path, updates)

    async def _on_node_death(self, msg: Inbound[p.NodeDeath]) -> None:
        death = msg.payload
        for path, stream in self.mirror.node_death(death.node, death.bdseq):
            gone, updates = self.mirror.death(path, stream, f"node {death.node} {death.reason}")
            self._put("death" if gone else "data", path, updates)

    def _put(self, kind: str, path: DevicePath, updates: list[Update]) -> None:
        if not self._online:
            if kind == "data":
                self.m_dropped.labels("offline").inc(len(updates))
            return  # the next session's births carry the current values
        if len(self._queue) >= self.settings.queue_size and kind == "data":
            self.m_dropped.labels("queue").inc(len(updates))
            return
        self._queue.append((kind, path, updates))
        self._ready.set()

    # ---- the Sparkplug side --------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "%s: Sparkplug edge node %s/%s on %s%s",
            self.node.id,
            self.group,
            self.edge,
            self.url,
            f", primary host {self.settings.primary_host_id}"
            if self.settings.primary_host_id
            else "",
        )
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._session()
                error = "the broker closed the connection"
            except _StartOver:
                attempt = 0
                continue
            except BusError as exc:
                error = str(exc)
            except ConfigError as exc:
                error = str(exc)
            finally:
                self._end_session()
            if time.monotonic() - started > 30:
                attempt = 0
            s = self.settings
            delay = min(s.reconnect_max_s, s.reconnect_min_s * 2**attempt)
            attempt += 1
            self._at = (self._at + 1) % len(self.urls)
            then = f" on {redact_url(self.url)}" if len(self.urls) > 1 else ""
            log.warning("%s: Sparkplug: %s; retrying in %.1f s%s", self.node.id, error, delay, then)
            await asyncio.sleep(delay)

    def _end_session(self) -> None:
        self._online = False
        self.m_connected.set(0)
        self._queue.clear()
        for dev in self.mirror.devices.values():
            dev.born = False
        self.changed.set()

    async def _session(self) -> None:
        s = self.settings
        self.bdseq = self.sessions % codec.SEQ_MODULUS  # a new bdSeq for every connection
        self.sessions += 1
        will = Will(
            codec.topic(self.group, "NDEATH", self.edge),
            codec.node_death(self.bdseq, now_ms()),
            qos=1,
            retain=False,
        )
        async with connect(
            self.url,
            client_id=f"spb-{self.group}-{self.edge}"[:128],
            will=will,
            settings=self.broker_settings,
        ) as bus:
            host_online = asyncio.Event()
            host_offline = asyncio.Event()
            await bus.subscribe(codec.topic(self.group, "NCMD", self.edge), qos=1)
            await bus.subscribe(codec.topic(self.group, "DCMD", self.edge, "+"), qos=1)
            if s.primary_host_id:
                await bus.subscribe(codec.state_topic(s.primary_host_id), qos=1)
            else:
                host_online.set()
            receiver = asyncio.create_task(self._receive(bus, host_online, host_offline))
            waiter = asyncio.create_task(host_online.wait())
            tasks: list[asyncio.Task[Any]] = [receiver, waiter]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if receiver.done():
                    receiver.result()  # the connection ended: raises why
                    return
                sender = asyncio.create_task(self._send(bus))
                offline = asyncio.create_task(host_offline.wait())
                tasks += [sender, offline]
                await asyncio.wait({receiver, sender, offline}, return_when=asyncio.FIRST_COMPLETED)
                for task in (receiver, sender):
                    if task.done():
                        task.result()  # raises why the session ended
                        return
                log.warning(
                    "%s: primary host %s went offline: NDEATH, disconnect, start over",
                    self.node.id,
                    s.primary_host_id,
                )
                await self._die(bus, will.topic)
                raise _StartOver
            except asyncio.CancelledError:  # a clean stop: the will is not sent, say it
                if self._online:
                    await asyncio.shield(self._die(bus, will.topic))
                raise
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _die(self, bus: Bus, topic: str) -> None:
        self._online = False
        try:
            await bus.publish(topic, codec.node_death(self.bdseq, now_ms()), qos=1)
        except BusError:
            return
        self.m_published.labels("NDEATH").inc()

    async def _receive(self, bus: Bus, online: asyncio.Event, offline: asyncio.Event) -> None:
        host_ts = -1
        state_topic = (
            codec.state_topic(self.settings.primary_host_id)
            if self.settings.primary_host_id
            else None
        )
        async for message in bus.messages():
            if message.topic == state_topic:
                try:
                    is_online, ts = codec.decode_state(message.payload)
                except codec.SparkplugError as exc:
                    self._throttled.warning("state", "%s: %s", self.node.id, exc)
                    continue
                if ts < host_ts:
                    continue  # an older STATE than the one we acted on (3.0: ignored)
                host_ts = ts
                if is_online:
                    online.set()
                elif online.is_set():
                    offline.set()
                continue
            try:
                t = codec.parse_topic(message.topic)
            except codec.SparkplugError:
                continue
            if t.message == "NCMD":
                await self._ncmd(message.payload)
            elif t.message == "DCMD":
                await self._dcmd(t.device or "", message.payload)
        raise BusError("the Sparkplug connection ended")

    async def _ncmd(self, data: bytes) -> None:
        try:
            payload = codec.decode_payload(data)
        except codec.SparkplugError:
            self.m_refused.labels("decode").inc()
            return
        for m in payload.metrics:
            if (m.name == codec.REBIRTH or (m.HasField("alias") and m.alias == 1)) and (
                m.WhichOneof("value") == "boolean_value" and m.boolean_value
            ):
                self._rebirth = True
                self._ready.set()
                return
        self.m_refused.labels("unknown_metric").inc()
        self._throttled.warning("ncmd", "%s: NCMD without a rebirth request ignored", self.node.id)

    async def _dcmd(self, device: str, data: bytes) -> None:
        """A write: refused unless its tag is in ``writable`` (then a ``cmd/write`` to the
        device in the namespace, the value checked against the tag's datatype and range)."""
        path = codec.device_path(self.node.enterprise, self.node.site, device)
        dev = self.mirror.devices.get(path) if path is not None else None
        try:
            payload = codec.decode_payload(data)
        except codec.SparkplugError as exc:
            self._refuse("decode", device, str(exc))
            return
        by_alias = {i.alias: i for i in dev.metrics.values()} if dev is not None else {}
        for m in payload.metrics:
            info = (
                (dev.metrics.get(m.name) if m.name else by_alias.get(m.alias))
                if dev is not None
                else None
            )
            name = info.name if info is not None else m.name or f"alias {m.alias}"
            tag = f"{path}/{name.removeprefix('raw/')}" if path is not None else ""
            if info is None or not name.startswith("raw/") or tag not in self._writable:
                self._refuse("read_only", device, name)
                continue
            try:
                value = codec.get_value(m, m.datatype if m.HasField("datatype") else info.datatype)
            except codec.SparkplugError as exc:
                self._refuse("type", device, f"{name}: {exc}")
                continue
            if value is None or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and (
                    (info.low is not None and value < info.low)
                    or (info.high is not None and value > info.high)
                )
            ):
                self._refuse("out_of_range", device, f"{name} = {value!r}")
                continue
            assert path is not None
            command = p.Command(
                ts=now_ms(),
                name="write",
                args={"metric": name.removeprefix("raw/"), "value": value},
                sender=f"sparkplug:{self.group}/{self.edge}",
            )
            await self.node.publish(path.topic("cmd", "write"), command, qos=1)
            self.writes_forwarded += 1
            self.m_forwarded.inc()
            self.changed.set()

    def _refuse(self, reason: str, device: str, what: str) -> None:
        self.m_refused.labels(reason).inc()
        self.writes_refused += 1
        self.changed.set()
        self._throttled.warning(
            f"dcmd-{reason}",
            "%s: refused a write to %s (%s): %s (counted as"
            ' uns_sparkplug_writes_refused_total{reason="%s"})',
            self.node.id,
            device,
            what[:200],
            "the tag is not writable (services.sparkplug.writable)"
            if reason == "read_only"
            else reason.replace("_", " "),
            reason,
        )

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (seq + 1) % codec.SEQ_MODULUS
        return seq

    async def _births(self, bus: Bus) -> None:
        """NBIRTH (seq 0) and a DBIRTH per device that has metrics."""
        self._queue.clear()  # the births carry every current value
        self._online = True
        self.seq = 0
        ts = now_ms()
        await bus.publish(
            codec.topic(self.group, "NBIRTH", self.edge),
            self.mirror.node_birth(self.bdseq, ts),
        )
        self.m_published.labels("NBIRTH").inc()
        self._next_seq()
        for dev in list(self.mirror.devices.values()):
            dev.born = False
            await self._device_birth(bus, dev)

    async def _device_birth(self, bus: Bus, dev: Any) -> None:
        dev.dirty = False
        if not dev.metrics or (not dev.streams and not _has_events(dev)):
            return
        await bus.publish(
            codec.topic(self.group, "DBIRTH", self.edge, dev.id),
            self.mirror.device_birth(dev, self._next_seq(), now_ms()),
        )
        dev.born = True
        self.m_published.labels("DBIRTH").inc()

    async def _send(self, bus: Bus) -> None:
        await self._births(bus)
        self.m_connected.set(1)
        self.changed.set()
        log.info(
            "%s: Sparkplug NBIRTH %s/%s bdSeq=%d with %d devices",
            self.node.id,
            self.group,
            self.edge,
            self.bdseq,
            sum(d.born for d in self.mirror.devices.values()),
        )
        while True:
            if self._rebirth:
                self._rebirth = False
                self.m_rebirths.inc()
                await self._births(bus)
                continue
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            kind, path, updates = self._queue.popleft()
            dev = self.mirror.devices.get(path)
            if dev is None:
                continue
            if kind == "death":
                if dev.born:
                    await self._device_death(bus, dev)
                continue
            if dev.dirty or not dev.born:
                if dev.born:
                    await self._device_death(bus, dev)  # 3.0: new metrics need a new DBIRTH
                await self._device_birth(bus, dev)
                continue  # the birth carries the current values
            if updates:
                await bus.publish(
                    codec.topic(self.group, "DDATA", self.edge, dev.id),
                    self.mirror.device_data(dev, updates, self._next_seq(), now_ms()),
                )
                self.m_published.labels("DDATA").inc()

    async def _device_death(self, bus: Bus, dev: Any) -> None:
        await bus.publish(
            codec.topic(self.group, "DDEATH", self.edge, dev.id),
            self.mirror.device_death(self._next_seq(), now_ms()),
        )
        dev.born = False
        self.m_published.labels("DDEATH").inc()


def _has_events(dev: Any) -> bool:
    return any(name.startswith("events/") for name in dev.metrics)
