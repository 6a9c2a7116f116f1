"""The service runtime: the same skeleton under every service.

A service is a `Service` subclass with a ``Settings`` struct. It declares what it
consumes with ``node.subscribe(filter, PayloadType, handler)`` and publishes with
``node.device_birth`` / ``node.device_data`` / ``node.publish``. The `Node` does
the rest:

* one MQTT connection per process, reconnected with jittered backoff;
* a retained node birth (and every device birth it knows) on each (re)connect,
  its Last Will a retained node death, an explicit death on a clean stop;
* Sparkplug sequence numbers (0..255 per node) and a birth/death sequence;
* ``rebirth`` on request (a `Command` on ``{ent}/{site}/_node/{id}/cmd``);
* bounded inbound and outbound queues whose drops are counted by reason;
* undecodable payloads dropped, counted as ``reason="decode"``, logged without
  a traceback; a handler may ``raise Reject(reason)`` to drop one message;
* the standard Prometheus metrics served over HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import msgspec

from uns import payloads as p
from uns.bus import Bus, Message, Will, connect
from uns.config import BrokerSettings, Port, PositiveFloat, Slug, Strict, UnsConfig
from uns.errors import BusError, PayloadError, Reject
from uns.metrics import ServiceMetrics, stream_label
from uns.topics import DevicePath, Stream, matches, node_topic, validate_filter

log = logging.getLogger(__name__)

P = TypeVar("P")


class ServiceSettings(Strict, frozen=True):
    """Settings every service has; a service's own settings subclass this."""

    enabled: bool = True
    """``uns up`` skips a disabled service."""
    node_id: Slug | None = None
    """This instance's edge-node id; the service name when absent."""
    metrics_host: str = "127.0.0.1"
    metrics_port: Port | None = None
    """Port of ``/metrics``; the service's default when absent, any free port when 0."""
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """Bound of the inbound and outbound queues."""
    reconnect_min_s: PositiveFloat = 0.25
    reconnect_max_s: PositiveFloat = 5.0


S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True, slots=True)
class Inbound(Generic[P]):
    """A decoded message handed to a handler."""

    topic: str
    payload: P
    retained: bool


Handler = Callable[[Inbound[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    kind: Any
    handler: Handler
    qos: int


class Service(Generic[S]):
    """Base class of a service: override `run` for own work, subscribe in ``__init__``."""

    name: ClassVar[str]
    Settings: ClassVar[type[ServiceSettings]] = ServiceSettings
    default_metrics_port: ClassVar[int] = 0
    version: ClassVar[str] = "0.1.0"

    def __init__(self, node: Node[S]) -> None:
        self.node = node
        self.settings: S = node.settings

    async def run(self) -> None:
        """The service's own long-running work (polling, simulating); handlers need none."""

    async def on_rebirth(self) -> None:
        """Called after every (re)birth: births carry no values, so a service that reports by
        exception sends its current values again (Sparkplug's DBIRTH carries them)."""

    async def on_node_command(self, command: p.Command) -> dict[str, Any]:
        """A command to this node other than ``rebirth``; the result goes to ``args.reply_to``.

        Raise `Reject` to refuse it (the reply then carries the reason).
        """
        raise Reject("unknown_command", f"{self.name} has no command {command.name!r}")


class _Outbox:
    """Bounded FIFO of messages to publish: backpressure while connected, drop-oldest offline."""

    def __init__(self, size: int, metrics: ServiceMetrics) -> None:
        self.items: collections.deque[tuple[str, Any, int, bool]] = collections.deque()
        self.size = size
        self.metrics = metrics
        self.not_empty = asyncio.Event()
        self.not_full = asyncio.Event()
        self.not_full.set()
        self.empty = asyncio.Event()
        self.empty.set()
        self.depth = metrics.queue_depth.labels(metrics.service, "outbound")

    async def put(self, item: tuple[str, Any, int, bool], online: asyncio.Event) -> None:
        while len(self.items) >= self.size:
            if not online.is_set():
                self.items.popleft()
                self.metrics.drop("offline")
                break
            self.not_full.clear()
            await self.not_full.wait()  # also woken when the connection drops
        self.items.append(item)
        self.not_empty.set()
        self.empty.clear()
        self.depth.set(len(self.items))

    def discard_deaths(self, topic: str) -> None:
        """A device born again: a death still queued for it would wrongly follow the birth."""
        kept = [i for i in self.items if not (i[0] == topic and isinstance(i[1], p.DeviceDeath))]
        if len(kept) != len(self.items):
            self.items = collections.deque(kept)
            if not self.items:
                self.not_empty.clear()
                self.empty.set()
            self.not_full.set()
            self.depth.set(len(self.items))

    def peek(self) -> tuple[str, Any, int, bool] | None:
        return self.items[0] if self.items else None

    def pop(self) -> None:
        self.items.popleft()
        if not self.items:
            self.not_empty.clear()
            self.empty.set()
        if len(self.items) < self.size:
            self.not_full.set()
        self.depth.set(len(self.items))


class _Throttled:
    """Logs the first occurrence at once, then at most one line per ``every_s`` with a count."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = collections.Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.every_s:
            n = self.suppressed.pop(key, 0)
            suffix = f" (and {n} more like it since the last report)" if n else ""
            log.warning(msg + suffix, *args)
            self.last[key] = now
        else:
            self.suppressed[key] += 1


class Node(Generic[S]):
    """One service instance as an edge node of the namespace."""

    def __init__(
        self,
        service: str,
        settings: S,
        config: UnsConfig,
        *,
        broker_url: str | None = None,
        version: str = "",
    ) -> None:
        self.service = service
        self.settings = settings
        self.config = config
        self.version = version
        self.id: str = settings.node_id or service
        self.enterprise = config.namespace.enterprise
        self.site = config.namespace.site
        self.broker: BrokerSettings = config.broker
        self.broker_url = broker_url or config.broker.url
        self.metrics = ServiceMetrics(service)
        self.metrics_url = ""
        self.connected = asyncio.Event()
        self.cmd_topic = node_topic(self.enterprise, self.site, self.id, "cmd")
        self._subs: list[_Subscription] = []
        self._devices: dict[tuple[DevicePath, Stream], list[p.MetricDef]] = {}
        self._outbox = _Outbox(settings.queue_size, self.metrics)
        self._inbound: asyncio.Queue[Message] = asyncio.Queue(settings.queue_size)
        self._bus: Bus | None = None
        self._seq = 0
        self._bdseq = 0
        self._send_lock = asyncio.Lock()
        self._closing = False
        self.running: Service[S] | None = None
        """The service this node runs, once `serve` has started."""
        self._throttled = _Throttled()

    # ---- what services call -------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        kind: type[P] | Any,
        handler: Callable[[Inbound[P]], Awaitable[None]],
        *,
        qos: int = 0,
    ) -> None:
        """Deliver messages matching ``topic_filter``, decoded as ``kind``, to ``handler``."""
        self._subs.append(_Subscription(validate_filter(topic_filter), kind, handler, qos))  # type: ignore[arg-type]

    async def publish(
        self, topic: str, payload: p.Payload | bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Queue a message; device messages get the node's next sequence number when sent."""
        await self._outbox.put((topic, payload, qos, retain), self.connected)

    async def device_birth(
        self, path: DevicePath, stream: Stream, metrics: list[p.MetricDef]
    ) -> None:
        """Declare (or redeclare) a device's metrics; replayed on every reconnect and rebirth."""
        async with self._send_lock:  # not while births are being replayed
            self._devices[(path, stream)] = list(metrics)
            online = self.connected.is_set()
            self._outbox.discard_deaths(path.topic(stream, "death"))
        if online:  # else the (re)connect publishes it with the node birth
            await self.publish(path.topic(stream, "death"), b"", qos=1, retain=True)
            await self.publish(
                path.topic(stream, "birth"),
                self._device_birth(path, metrics, 0),
                qos=1,
                retain=True,
            )

    async def device_data(
        self,
        path: DevicePath,
        stream: Stream,
        metrics: list[p.Metric],
        *,
        ts: int | None = None,
        qos: int = 0,
        window: p.Window | None = None,
        model: p.ModelRef | None = None,
    ) -> None:
        data = p.DeviceData(
            ts=ts or p.now_ms(), node=self.id, seq=0, metrics=metrics, window=window, model=model
        )
        await self.publish(path.topic(stream, "data"), data, qos=qos)

    async def drained(self) -> None:
        """Wait until everything queued so far has been handed to the broker."""
        await self._outbox.empty.wait()

    async def device_death(self, path: DevicePath, stream: Stream, reason: str = "") -> None:
        """The device is gone: consumers must treat its last values as stale."""
        self._devices.pop((path, stream), None)
        death = p.DeviceDeath(
            ts=p.now_ms(), node=self.id, device=str(path), bdseq=self._bdseq, seq=0, reason=reason
        )
        await self.publish(path.topic(stream, "death"), death, qos=1, retain=True)

    async def rebirth(self) -> None:
        """Publish the node birth and every device birth again (Sparkplug rebirth)."""
        bus = self._bus
        if bus is not None:
            async with self._send_lock:
                await self._births(bus)
            if self.running is not None:
                await self.running.on_rebirth()

    # ---- the loop -------------------------------------------------------------------

    async def serve(self, service: Service[S], stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then die cleanly. A crash in the service propagates."""
        self.running = service
        port = self.settings.metrics_port
        if port is None:
            port = type(service).default_metrics_port
        bound = self.metrics.serve(self.settings.metrics_host, port)
        self.metrics_url = f"http://{self.settings.metrics_host}:{bound}/metrics"
        try:
            async with asyncio.TaskGroup() as tg:
                worker = tg.create_task(self._work(), name=f"{self.id}-work")
                runner = tg.create_task(service.run(), name=f"{self.id}-run")
                await self._connection_loop(stop)
                worker.cancel()
                runner.cancel()
        finally:
            self.metrics.close()

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            if attempt:
                self.metrics.reconnects.labels(self.service).inc()
            will = Will(
                node_topic(self.enterprise, self.site, self.id, "death"),
                p.encode(p.NodeDeath(ts=p.now_ms(), node=self.id, bdseq=self._bdseq)),
            )
            try:
                async with connect(
                    self.broker_url, client_id=self.id, will=will, settings=self.broker
                ) as bus:
                    attempt = 0
                    await self._session(bus, stop)
                return
            except BusError as exc:
                delay = min(
                    self.settings.reconnect_max_s,
                    self.settings.reconnect_min_s * 2 ** min(attempt, 16),
                )
                delay *= random.uniform(0.8, 1.2)
                attempt += 1
                log.warning("%s: %s; retrying in %.1f s", self.id, exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
            finally:
                self._bus = None
                self.connected.clear()
                self._outbox.not_full.set()  # blocked publishers: offline now, drop oldest
                self.metrics.connected.labels(self.service).set(0)
                self._bdseq = p.next_seq(self._bdseq)

    async def _session(self, bus: Bus, stop: asyncio.Event) -> None:
        self._bus = bus
        await bus.subscribe(self.cmd_topic, qos=1)
        for sub in self._subs:
            await bus.subscribe(sub.topic_filter, qos=sub.qos)
        async with self._send_lock:
            await self._births(bus)
        self.connected.set()
        self.metrics.connected.labels(self.service).set(1)
        log.info("%s: connected to %s, births published", self.id, self.broker_url)
        self._closing = False
        receiver = asyncio.create_task(self._receive(bus), name=f"{self.id}-receive")
        sender = asyncio.create_task(self._send(bus), name=f"{self.id}-send")
        stopper = asyncio.create_task(stop.wait(), name=f"{self.id}-stop")
        try:
            if self.running is not None:
                await self.running.on_rebirth()  # the sender runs: values may queue
            done, _ = await asyncio.wait(
                {receiver, sender, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled: the service crashed elsewhere
            for t in (receiver, sender, stopper):
                t.cancel()
            await self._die(bus, "error")
            raise
        receiver.cancel()
        stopper.cancel()
        for t in (receiver, sender):
            if t in done and t.exception() is not None:
                sender.cancel()
                raise t.exception()  # type: ignore[misc]
        # A clean stop. The sender is not cancelled mid-publish (on Python 3.11 a
        # cancellation racing aiomqtt's wait_for can be lost): it sends what is
        # queued and returns by itself.
        self._closing = True
        self._outbox.not_empty.set()
        finished, _ = await asyncio.wait({sender}, timeout=2.0)
        if sender not in finished:
            sender.cancel()
            log.warning(
                "%s: %d queued messages not sent at shutdown", self.id, len(self._outbox.items)
            )
        await self._die(bus, "shutdown")

    async def _die(self, bus: Bus, reason: str) -> None:
        self.connected.clear()
        death = p.NodeDeath(ts=p.now_ms(), node=self.id, bdseq=self._bdseq, reason=reason)
        publish = asyncio.create_task(
            bus.publish(
                node_topic(self.enterprise, self.site, self.id, "death"),
                p.encode(death),
                qos=1,
                retain=True,
            )
        )
        done, _ = await asyncio.wait({publish}, timeout=2.0)
        if publish not in done:
            publish.cancel()
        elif publish.exception() is not None:
            pass  # the broker is gone too; our will tells the story

    async def _births(self, bus: Bus) -> None:
        self._seq = 0
        birth = p.NodeBirth(
            ts=p.now_ms(),
            node=self.id,
            service=self.service,
            version=self.version,
            bdseq=self._bdseq,
            seq=0,
            host=socket.gethostname(),
            metrics_url=self.metrics_url,
        )
        base = node_topic(self.enterprise, self.site, self.id, "birth")
        await bus.publish(
            node_topic(self.enterprise, self.site, self.id, "death"), b"", qos=1, retain=True
        )
        await bus.publish(base, p.encode(birth), qos=1, retain=True)
        births = 1
        for (path, stream), metrics in list(self._devices.items()):
            await bus.publish(path.topic(stream, "death"), b"", qos=1, retain=True)
            dbirth = self._device_birth(path, metrics, self._next_seq())
            await bus.publish(path.topic(stream, "birth"), p.encode(dbirth), qos=1, retain=True)
            births += 1
        self.metrics.births.labels(self.service).inc(births)
        self.metrics.published.labels(self.service, "node").inc()

    def _device_birth(
        self, path: DevicePath, metrics: list[p.MetricDef], seq: int
    ) -> p.DeviceBirth:
        return p.DeviceBirth(
            ts=p.now_ms(),
            node=self.id,
            device=str(path),
            bdseq=self._bdseq,
            seq=seq,
            metrics=metrics,
        )

    def _next_seq(self) -> int:
        self._seq = p.next_seq(self._seq)
        return self._seq

    async def _send(self, bus: Bus) -> None:
        outbox = self._outbox
        published = self.metrics.published
        while True:
            item = outbox.peek()
            if item is None:
                if self._closing:
                    return
                outbox.not_empty.clear()
                await outbox.not_empty.wait()
                continue
            async with self._send_lock:
                await self._send_one(bus, item)
            outbox.pop()
            published.labels(self.service, stream_label(item[0])).inc()

    async def _send_one(self, bus: Bus, item: tuple[str, Any, int, bool]) -> None:
        topic, payload, qos, retain = item
        if isinstance(payload, (p.DeviceData, p.DeviceDeath)):
            payload = msgspec.structs.replace(payload, seq=self._next_seq())
        elif isinstance(payload, p.DeviceBirth):
            payload = msgspec.structs.replace(payload, seq=self._next_seq(), bdseq=self._bdseq)
        data = payload if isinstance(payload, bytes) else p.encode(payload)
        await bus.publish(topic, data, qos=qos, retain=retain)

    async def _receive(self, bus: Bus) -> None:
        received = self.metrics.received
        inbound = self._inbound
        depth = self.metrics.queue_depth.labels(self.service, "inbound")
        async for message in bus.messages():
            received.labels(self.service, stream_label(message.topic)).inc()
            try:
                inbound.put_nowait(message)
            except asyncio.QueueFull:
                self.metrics.drop("overflow")
                self._throttled.warning(
                    "overflow",
                    "%s: inbound queue full (%d); dropping %s",
                    self.id,
                    inbound.maxsize,
                    message.topic,
                )
            depth.set(inbound.qsize())

    async def _work(self) -> None:
        while True:
            message = await self._inbound.get()
            await self._dispatch(message)

    async def _dispatch(self, message: Message) -> None:
        if not message.payload:
            return  # a retained message being cleared: nothing to handle
        if message.topic == self.cmd_topic:
            await self._node_command(message)
            return
        for sub in self._subs:
            if not matches(sub.topic_filter, message.topic):
                continue
            try:
                payload = p.decode(message.payload, sub.kind)
            except PayloadError as exc:
                self.metrics.drop("decode")
                self._throttled.warning(
                    "decode",
                    "%s: dropped undecodable message on %s: %s",
                    self.id,
                    message.topic,
                    exc,
                )
                continue
            started = time.perf_counter()
            try:
                await sub.handler(Inbound(message.topic, payload, message.retain))
            except Reject as exc:
                self.metrics.drop(exc.reason)
                self._throttled.warning(
                    f"reject-{exc.reason}",
                    "%s: dropped message on %s: %s",
                    self.id,
                    message.topic,
                    exc,
                )
            finally:
                self.metrics.handler_seconds.labels(self.service).observe(
                    time.perf_counter() - started
                )

    async def _node_command(self, message: Message) -> None:
        try:
            command: p.Command = p.decode(message.payload, p.Command)
        except PayloadError as exc:
            self.metrics.drop("decode")
            self._throttled.warning("decode", "%s: dropped undecodable command: %s", self.id, exc)
            return
        reply = p.Reply(ts=p.now_ms(), id=command.id)
        if command.name == "rebirth":
            log.info("%s: rebirth requested by %s", self.id, command.sender or "someone")
            await self.rebirth()
        elif self.running is not None:
            try:
                result = await self.running.on_node_command(command)
                reply = p.Reply(ts=p.now_ms(), id=command.id, result=result)
            except Reject as exc:
                self.metrics.drop(exc.reason)
                log.warning("%s: command %r refused: %s", self.id, command.name, exc)
                reply = p.Reply(ts=p.now_ms(), id=command.id, ok=False, error=str(exc))
        reply_to = command.args.get("reply_to")
        if isinstance(reply_to, str) and reply_to:
            await self.publish(reply_to, reply, qos=1)
