"""The service runtime: the same skeleton under every service.

A service is a `Service` subclass with a ``Settings`` struct. It declares what it
consumes with ``node.subscribe(filter, PayloadType, handler)`` and publishes with
``node.device_birth`` / ``node.device_data`` / ``node.publish``. The `Node` does
the rest:

* one MQTT connection per process, reconnected with jittered backoff (to the next of
  ``broker.urls`` when there are several: the nodes of a clustered broker);
* a retained node birth (and every device birth it knows) on each (re)connect,
  its Last Will a retained node death, an explicit death on a clean stop;
* Sparkplug sequence numbers (0..255 per node) and a birth/death sequence;
* ``rebirth`` on request (a `Command` on ``{ent}/{site}/_node/{id}/cmd``), at most
  one per ``rebirth_min_interval_s``; a reply only on a topic the node may publish to;
* bounded inbound and outbound queues whose drops are counted by reason;
* undecodable payloads dropped, counted as ``reason="decode"``, logged without
  a traceback; a handler may ``raise Reject(reason)`` to drop one message;
* any other exception of a handler drops only that message (``reason="error"``,
  ``uns_handler_errors_total``, its traceback logged at most once per interval);
* the standard Prometheus metrics served over HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Generic, Literal, TypeVar

import msgspec

from uns import payloads as p
from uns.bus import Bus, Message, Will, connect
from uns.config import BrokerSettings, Port, PositiveFloat, Slug, Strict, UnsConfig, redact_url
from uns.errors import BusError, ConfigError, PayloadError, Reject, TopicError
from uns.metrics import ServiceMetrics, stream_label
from uns.scope import Scope, node_scope, reply_prefix
from uns.shard import Shard
from uns.topics import (
    NODE_LEVEL,
    DevicePath,
    Stream,
    matches,
    node_topic,
    parse,
    validate_filter,
)
from uns.watchdog import HEARTBEAT_ENV, LoopWatchdog

log = logging.getLogger(__name__)

MAX_REPLY_TOPIC_BYTES: Final = 1024

P = TypeVar("P")


class ServiceSettings(Strict, frozen=True):
    """Settings every service has; a service's own settings subclass this."""

    default_metrics_port: ClassVar[int] = 0
    bus_client: ClassVar[bool] = True
    """The service is a node of the bus (False: the broker itself), so the broker policy
    (`uns.policy`) gives it a user."""
    """The service's ``/metrics`` port when ``metrics_port`` is absent (0: any free port).
    Here, not on the service class, so that `uns up` plans ports from the light settings
    module alone."""

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
    """The longest wait between two connection attempts (jitter included): after a broker
    restart the node is back within this plus the time to connect."""
    loop_watchdog_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """A stuck service exits: when the event loop has not run for this long (a handler
    blocking it), the process logs where the loop is stuck and exits with code 70, so the
    broker publishes its death and the supervisor restarts it; 0: never."""
    rebirth_min_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """At most one rebirth per this time on request; requests within it are coalesced into
    one at its end (the rest counted as ``reason="rebirth_rate"``); 0: no limit."""
    replicas: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Replicas of a service that shards by device (`Service.shard_by_device`): with N > 1
    the node id is ``{name}-{index}`` (index 0..N-1) and this replica handles only the
    devices `uns.shard` gives it among the replicas alive; 1: every device."""

    def idle_reason(self) -> str | None:
        """Why, with these settings, the service would have nothing to do (``uns up`` then
        does not start it, and says so), or None. A bridge without a remote only idles."""
        return None

    def scope(self, config: UnsConfig) -> Scope | None:
        """The topics this service publishes and subscribes to, besides its node's own
        (birth, death, command, replies: `uns.scope.node_scope`), for ``config``.

        The one declaration of what the service does on the bus: its `Node` refuses to
        publish outside it (counted as ``reason="out_of_scope"``) and to subscribe outside
        it, and ``uns broker secure`` makes the broker ACLs of it. Here, on the light
        settings, so that the policy is made without importing the service. None (the
        default): undeclared, nothing is checked and the broker policy grants the node's
        own topics only."""
        return None

    def peers(self, config: UnsConfig) -> dict[str, Scope]:
        """Broker users this service's peers need while it is enabled (user name ->
        scope), which ``uns broker secure`` adds to the policy: e.g. the SCADA host that
        reads the Sparkplug edge node and sends it commands. None by default."""
        return {}


S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True, slots=True)
class Inbound(Generic[P]):
    """A decoded message handed to a handler."""

    topic: str
    payload: P
    retained: bool
    ack: Callable[[], None] = lambda: None
    """For a `Service.persistent_session`: a handler that returns normally owns the
    message's acknowledgement and calls this once it has kept the message (journaled
    it); until then the broker keeps it and sends it again after a crash. A no-op for
    every other service (acknowledged on receipt)."""
    redelivered: bool = False
    """The broker sent it again (MQTT DUP): a persistent session resumed before the
    service acknowledged it, so the service may have kept it already."""


Handler = Callable[[Inbound[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    kind: Any
    handler: Handler
    qos: int


class _Ack:
    """Acknowledges one message once, however often it is called (a packet id is reused
    after its ack: a second PUBACK could acknowledge another message)."""

    __slots__ = ("bus", "message")

    def __init__(self, bus: Bus, message: Message) -> None:
        self.bus: Bus | None = bus
        self.message = message

    def __call__(self) -> None:
        if self.bus is not None:
            self.bus.ack(self.message)
            self.bus = None


class Service(Generic[S]):
    """Base class of a service: override `run` for own work, subscribe in ``__init__``."""

    name: ClassVar[str]
    Settings: ClassVar[type[ServiceSettings]] = ServiceSettings
    version: ClassVar[str] = "0.1.0"
    persistent_session: ClassVar[bool] = False
    """Its subscriptions outlive the process: the broker session is persistent (the node
    id is the client id, clean_session false) and QoS 1 messages are acknowledged only
    through `Inbound.ack`, so what is published while it restarts, or what it received
    and had not kept when it was killed, is delivered to it again (a duplicate bound:
    the broker's in-flight window). For a store-and-forward service (the bridge)."""

    shard_by_device: ClassVar[bool] = False
    """Its replicas may split the devices between them (``replicas`` in its settings,
    `uns.shard`): its state is per device, and a device's data and deaths reach one
    replica only."""

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


SEND_WINDOW: Final = 20
"""Publishes in flight at once (paho's QoS 1 in-flight limit): a QoS 1 message waits for
its PUBACK without holding up the ones behind it (one at a time halved the throughput)."""


class _Outbox:
    """Bounded FIFO of messages to publish: backpressure while connected, drop-oldest offline.

    A message leaves it only once the broker has it: `take` moves it to ``inflight``,
    `confirm` forgets the oldest in flight, `requeue` puts every unconfirmed one back at
    the head (the connection failed: sent again first, at least once).
    """

    def __init__(self, size: int, metrics: ServiceMetrics) -> None:
        self.items: collections.deque[tuple[str, Any, int, bool]] = collections.deque()
        self.inflight: collections.deque[tuple[str, Any, int, bool]] = collections.deque()
        self.size = size
        self.metrics = metrics
        self._offline_drops = 0  # since the last log line about them
        self._offline_logged = -float("inf")
        self.not_empty = asyncio.Event()
        self.not_full = asyncio.Event()
        self.not_full.set()
        self.empty = asyncio.Event()
        self.empty.set()
        self.depth = metrics.queue_depth.labels(metrics.service, "outbound")

    async def put(self, item: tuple[str, Any, int, bool], online: asyncio.Event) -> None:
        while len(self.items) + len(self.inflight) >= self.size:
            if not online.is_set():
                if self.items:  # (none in flight while offline: the sender put them back)
                    self.items.popleft()
                    self._dropped_offline()
                break
            self.not_full.clear()
            await self.not_full.wait()  # also woken when the connection drops
        self.items.append(item)
        self.not_empty.set()
        self.empty.clear()
        self.depth.set(len(self.items) + len(self.inflight))

    def _dropped_offline(self) -> None:
        self.metrics.drop("offline")
        self._offline_drops += 1
        now = time.monotonic()
        if now - self._offline_logged >= 10.0:
            log.warning(
                "%s: the broker is away and the outbound queue is full (%d): dropped the"
                " oldest %d message(s) since the last report (counted as reason=offline)",
                self.metrics.service,
                self.size,
                self._offline_drops,
            )
            self._offline_drops, self._offline_logged = 0, now

    def abandon(self) -> int:
        """Forget every queued message (the node stops); return how many there were."""
        n = len(self.items) + len(self.inflight)
        if n:
            self.items.clear()
            self.inflight.clear()
            self.not_empty.clear()
            self.empty.set()
            self.not_full.set()
            self.depth.set(0)
        return n

    def take(self) -> tuple[str, Any, int, bool]:
        """The oldest queued message, now in flight."""
        item = self.items.popleft()
        self.inflight.append(item)
        if not self.items:
            self.not_empty.clear()
        return item

    def confirm(self) -> None:
        """The broker has the oldest message in flight."""
        self.inflight.popleft()
        n = len(self.items) + len(self.inflight)
        if not n:
            self.empty.set()
        if n < self.size:
            self.not_full.set()
        self.depth.set(n)

    def requeue(self) -> None:
        """Every message in flight back at the head, in order."""
        if self.inflight:
            self.items.extendleft(reversed(self.inflight))
            self.inflight.clear()
            self.not_empty.set()

    def discard_deaths(self, topic: str) -> None:
        """A device born again: a death still queued for it would wrongly follow the birth."""
        kept = [i for i in self.items if not (i[0] == topic and isinstance(i[1], p.DeviceDeath))]
        if len(kept) != len(self.items):
            self.items = collections.deque(kept)
            if not self.items:
                self.not_empty.clear()
                if not self.inflight:
                    self.empty.set()
            self.not_full.set()
            self.depth.set(len(self.items) + len(self.inflight))


class _SendLock(asyncio.Lock):
    """The node's send lock, which says whether someone waits for it: the sender holds it
    while it has messages in flight and lets births (which publish around the outbox)
    go first, so that they never interleave with data numbered before them."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


class Throttled:
    """Logs the first occurrence at once, then at most one line per ``every_s`` with a count
    (a flood of bad input must not become a flood of log lines); on ``logger``."""

    def __init__(self, every_s: float = 10.0, *, logger: logging.Logger = log) -> None:
        self.every_s = every_s
        self.logger = logger
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = collections.Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def log(
        self,
        level: int,
        key: str,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log at ``level`` unless ``key`` was logged within ``every_s`` (then count it)."""
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.every_s:
            n = self.suppressed.pop(key, 0)
            suffix = f" (and {n} more like it since the last report)" if n else ""
            self.logger.log(level, msg + suffix, *args, exc_info=exc_info)
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
        self.broker_urls = config.broker.candidates(self.broker_url)
        """Every broker this node may use, in the order tried (``broker.urls``)."""
        self._broker_at = 0  # the one in use (or tried next) in broker_urls
        self.metrics = ServiceMetrics(service)
        self.metrics_url = ""
        self.connected = asyncio.Event()
        self.cmd_topic = node_topic(self.enterprise, self.site, self.id, "cmd")
        declared = settings.scope(config)
        self.scope: Scope | None = (
            None if declared is None else node_scope(self.enterprise, self.site, self.id) | declared
        )
        """What this node may publish and subscribe to; None: undeclared, unchecked."""
        self.shard: Shard | None = (
            None
            if settings.replicas == 1
            else Shard(self.enterprise, self.site, self.id, settings.replicas)
        )
        """This replica's share of the devices; None: every device (one replica)."""
        self._subs: list[_Subscription] = []
        self._devices: dict[tuple[DevicePath, Stream], list[p.MetricDef]] = {}
        self._disowned: set[tuple[DevicePath, Stream]] = set()
        """Devices born here that another replica owns now (`uns.shard`)."""
        self._outbox = _Outbox(settings.queue_size, self.metrics)
        self._inbound: asyncio.Queue[tuple[Message, Bus]] = asyncio.Queue(settings.queue_size)
        self._bus: Bus | None = None
        self._seq = 0
        self._bdseq = 0
        self._send_lock = _SendLock()
        self._closing = False
        self.running: Service[S] | None = None
        """The service this node runs, once `serve` has started."""
        self._throttled = Throttled()
        self._last_rebirth = -float("inf")  # monotonic time of the last requested rebirth
        self._rebirth_due: float | None = None  # a coalesced rebirth waits until then

    # ---- what services call -------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        kind: type[P] | Any,
        handler: Callable[[Inbound[P]], Awaitable[None]],
        *,
        qos: int = 0,
    ) -> None:
        """Deliver messages matching ``topic_filter``, decoded as ``kind``, to ``handler``.

        A filter outside the declared `scope` is a bug (the broker's ACL would refuse it):
        `TopicError` at once, naming it."""
        validate_filter(topic_filter)
        if self.scope is not None and not self.scope.may_subscribe(topic_filter):
            raise TopicError(
                f"{self.id}: subscribes to {topic_filter!r}, outside the topics its settings"
                f" declare ({', '.join(self.scope.subscribe)}): declare it in scope()"
            )
        self._subs.append(_Subscription(validate_filter(topic_filter), kind, handler, qos))  # type: ignore[arg-type]

    async def publish(
        self, topic: str, payload: p.Payload | bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Queue a message; device messages get the node's next sequence number when sent.

        A topic outside the declared `scope` is refused: counted as ``reason="out_of_scope"``
        and logged at most once per interval (a secure broker would drop it silently)."""
        if self._out_of_scope(topic):
            return
        await self._outbox.put((topic, payload, qos, retain), self.connected)

    def _out_of_scope(self, topic: str) -> bool:
        if self.scope is None or self.scope.may_publish(topic):
            return False
        self.metrics.drop("out_of_scope")
        self._throttled.warning(
            "out_of_scope",
            "%s: refused to publish to %.200s, outside the topics its settings declare"
            " (counted as reason=out_of_scope)",
            self.id,
            topic,
        )
        return True

    async def device_birth(
        self, path: DevicePath, stream: Stream, metrics: list[p.MetricDef]
    ) -> None:
        """Declare (or redeclare) a device's metrics; replayed on every reconnect and rebirth.

        A device outside the declared `scope` is refused like any message (never born)."""
        if self._out_of_scope(path.topic(stream, "birth")):
            return
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
        qos: int | None = None,
        window: p.Window | None = None,
        model: p.ModelRef | None = None,
        signals: dict[str, p.SignalWindow] | None = None,
        data_ts: int | None = None,
    ) -> None:
        """Queue one data message. ``qos`` by default: 0 for ``raw`` (the high-rate stream,
        latest value wins), 1 for the derived streams the bridge forwards (``features``,
        ``scores``, ``events``): the broker acknowledges each, so none is lost between
        this node and the broker, and it queues them for a persistent-session consumer
        (the bridge) while that one restarts. ``data_ts``: the window's end by default."""
        if qos is None:
            qos = 0 if stream == "raw" else 1
        if data_ts is None and window is not None:
            data_ts = window.end
        data = p.DeviceData(
            ts=ts or p.now_ms(),
            data_ts=data_ts,
            node=self.id,
            seq=0,
            metrics=metrics,
            window=window,
            model=model,
            signals=signals,
        )
        await self.publish(path.topic(stream, "data"), data, qos=qos)

    async def _reclaim(self) -> None:
        """The replica set changed: announce again the devices this replica owns anew
        (another replica's births of them are the retained ones), and leave the ones it
        lost to their new owner (not replayed on a rebirth)."""
        for key, metrics in list(self._devices.items()):
            if not self.owns(key[0]):
                self._disowned.add(key)
            elif key in self._disowned:
                self._disowned.discard(key)
                await self.device_birth(*key, metrics)

    def owns(self, path: DevicePath) -> bool:
        """Whether this replica handles ``path`` now (`uns.shard`; always, for one replica):
        for what a service announces of its own accord, e.g. a stream's birth at start."""
        return self.shard is None or self.shard.owns_device(str(path))

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
            try:
                async with self._send_lock:
                    await self._births(bus)
            except BusError as exc:  # the reconnect publishes every birth anyway
                log.info("%s: rebirth cut short: %s", self.id, exc)
                return
            if self.running is not None:
                await self.running.on_rebirth()

    # ---- the loop -------------------------------------------------------------------

    async def serve(self, service: Service[S], stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then die cleanly. A crash in the service propagates."""
        self.running = service
        if self.shard is not None and not service.shard_by_device:
            raise ValueError(
                f"{self.id}: replicas: {self.settings.replicas}, but {self.service} does not"
                " shard by device (every replica would handle every device)"
            )
        port = self.settings.metrics_port
        if port is None:
            port = self.settings.default_metrics_port
        try:
            bound = self.metrics.serve(self.settings.metrics_host, port)
        except OSError as exc:  # taken (another program, another instance), or no such host
            raise ConfigError(
                f"services.{self.service}.metrics_port: cannot serve /metrics on"
                f" {self.settings.metrics_host}:{port}: {exc.strerror or exc} (another"
                " program or another instance of this service uses it? --metrics-port 0"
                " takes any free port)"
            ) from None
        self.metrics_url = f"http://{self.settings.metrics_host}:{bound}/metrics"
        watchdog = LoopWatchdog(
            self.id,
            self.settings.loop_watchdog_s,
            registry=self.metrics.registry,
            service=self.service,
            heartbeat_file=os.environ.get(HEARTBEAT_ENV),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                beat = tg.create_task(watchdog.run(), name=f"{self.id}-heartbeat")
                worker = tg.create_task(self._work(), name=f"{self.id}-work")
                runner = tg.create_task(service.run(), name=f"{self.id}-run")
                await self._connection_loop(stop)
                worker.cancel()
                runner.cancel()
                beat.cancel()
        finally:
            self.metrics.close()

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        try:
            await self._connect_and_serve(stop)
        finally:
            if n := self._outbox.abandon():
                self.metrics.drop("shutdown", n)
                log.warning(
                    "%s: stopped with %d queued messages not sent (counted as reason=shutdown)",
                    self.id,
                    n,
                )

    async def _connect_and_serve(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            if attempt:
                self.metrics.reconnects.labels(self.service).inc()
            will = Will(
                node_topic(self.enterprise, self.site, self.id, "death"),
                p.encode(p.NodeDeath(ts=p.now_ms(), node=self.id, bdseq=self._bdseq)),
            )
            persistent = self.running is not None and self.running.persistent_session
            # The node id is the client id, on the first broker. On a fallback (another
            # node of a cluster) a clean session is "{id}.{k}": RabbitMQ 3.10 names a
            # subscription's queue after the client id and homes it on the node the
            # client was on, so after that node died the same id could not subscribe
            # anywhere else (404 "home node ... is down") until it came back. A
            # persistent session keeps its id: the id is the session.
            client_id = self.id
            if self._broker_at and not persistent:
                client_id = f"{self.id}.{self._broker_at}"
            try:
                # A publish waits as long as the connection lives (keepalive bounds that):
                # a broker that is slow to read (loaded, or a long GC) is not a dead one,
                # and giving up after 10 s tore down a working connection, losing what the
                # sockets held (measured: 633 of 6,000 QoS 0 messages, none counted).
                async with connect(
                    self.broker_urls[self._broker_at],
                    client_id=client_id,
                    will=will,
                    settings=self.broker,
                    publish_timeout_s=math.inf,
                    max_inflight=SEND_WINDOW,
                    clean_session=not persistent,
                    manual_ack=persistent,
                ) as bus:
                    await self._session(bus, stop)
                return
            except BusError as exc:
                if self.connected.is_set():
                    attempt = 0  # a session that worked: start the backoff again
                # jittered, and never above reconnect_max_s: after a broker restart a node
                # is back within reconnect_max_s plus the time to connect. With several
                # brokers (broker.urls) the next one is tried, and the wait grows once all
                # of them were: a dead node of a cluster costs one short wait.
                n = len(self.broker_urls)
                delay = min(
                    self.settings.reconnect_max_s,
                    self.settings.reconnect_min_s
                    * 2 ** min(attempt // n, 16)
                    * random.uniform(0.8, 1.2),
                )
                attempt += 1
                self._broker_at = (self._broker_at + 1) % n
                then = f" on {redact_url(self.broker_urls[self._broker_at])}" if n > 1 else ""
                log.warning("%s: %s; retrying in %.1f s%s", self.id, exc, delay, then)
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
        if self.shard is not None:  # the replica set first: known before any device's data
            for topic in self.shard.topics:
                await bus.subscribe(topic, qos=1)
        for sub in self._subs:
            await bus.subscribe(sub.topic_filter, qos=sub.qos)
        async with self._send_lock:
            await self._births(bus)
        self.connected.set()
        self.metrics.connected.labels(self.service).set(1)
        log.info(
            "%s: connected to %s, births published",
            self.id,
            redact_url(self.broker_urls[self._broker_at]),
        )
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
                if not sender.done():
                    # waited for, so that it never overlaps the next session's sender (its
                    # item stays at the head of the outbox, to be sent again)
                    sender.cancel()
                    await asyncio.wait({sender}, timeout=2.0)
                raise t.exception()  # type: ignore[misc]
        # A clean stop. The sender is not cancelled mid-publish (on Python 3.11 a
        # cancellation racing aiomqtt's wait_for can be lost): it sends what is
        # queued and returns by itself.
        self._closing = True
        self._outbox.not_empty.set()
        finished, _ = await asyncio.wait({sender}, timeout=2.0)
        if sender not in finished:
            sender.cancel()  # what it did not send is counted by _connection_loop
            await asyncio.wait({sender}, timeout=1.0)
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
        # Zero bytes retained delete the last session's death: the one kind of message
        # outside the payload schema (uns-schema/README.md, "Messages that are not payloads").
        await bus.publish(
            node_topic(self.enterprise, self.site, self.id, "death"), b"", qos=1, retain=True
        )
        await bus.publish(base, p.encode(birth), qos=1, retain=True)
        births = 1
        for (path, stream), metrics in list(self._devices.items()):
            if not self.owns(path):  # another replica's now: its owner announces it
                self._disowned.add((path, stream))
                continue
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
        """Publish the outbox in order, up to `SEND_WINDOW` at a time; a message is taken
        off only once its publish returned (QoS 1: acknowledged). On a failure every one
        still in flight goes back to the head, to be sent first by the next session."""
        outbox, lock = self._outbox, self._send_lock
        published = self.metrics.published
        window: collections.deque[tuple[str, asyncio.Future[None] | None]] = collections.deque()
        held = False
        try:
            while True:
                # Issue while there is room, in order (a sequence number is given here),
                # unless births wait: they publish around the outbox and must not
                # interleave with messages numbered before them.
                while outbox.items and len(window) < SEND_WINDOW and not (held and lock.waiting):
                    if not held:
                        await lock.acquire()
                        held = True
                        continue
                    item = outbox.take()
                    window.append((item[0], self._send_one(bus, item)))
                if window:
                    topic, sending = window[0]
                    if sending is not None:
                        await sending  # a BusError ends the session
                    window.popleft()
                    outbox.confirm()
                    if sending is not None:
                        published.labels(self.service, stream_label(topic)).inc()
                    if not window:
                        lock.release()
                        held = False
                    continue
                if held:
                    lock.release()
                    held = False
                    if outbox.items:
                        continue  # births were waiting: they go first, then the rest
                if self._closing:
                    return
                outbox.not_empty.clear()
                await outbox.not_empty.wait()
        finally:
            for _, sending in window:
                if sending is not None:
                    sending.cancel()
            outbox.requeue()
            if held:
                lock.release()

    def _send_one(self, bus: Bus, item: tuple[str, Any, int, bool]) -> asyncio.Future[None] | None:
        """Number and encode ``item`` now; its publish runs as a task (None: dropped)."""
        topic, payload, qos, retain = item
        if isinstance(payload, (p.DeviceData, p.DeviceDeath)):
            payload = msgspec.structs.replace(payload, seq=self._next_seq())
        elif isinstance(payload, p.DeviceBirth):
            payload = msgspec.structs.replace(payload, seq=self._next_seq(), bdseq=self._bdseq)
        try:
            data = payload if isinstance(payload, bytes) else p.encode(payload)
        except (TypeError, ValueError, OverflowError) as exc:  # a value JSON cannot carry
            self.metrics.drop("encode")
            self._throttled.warning(
                "encode",
                "%s: dropped a message to %.200s it cannot encode: %s",
                self.id,
                topic,
                exc,
            )
            return None
        return asyncio.ensure_future(bus.publish(topic, data, qos=qos, retain=retain))

    async def _receive(self, bus: Bus) -> None:
        received = self.metrics.received
        inbound = self._inbound
        depth = self.metrics.queue_depth.labels(self.service, "inbound")
        async for message in bus.messages():
            received.labels(self.service, stream_label(message.topic)).inc()
            try:
                inbound.put_nowait((message, bus))
            except asyncio.QueueFull:
                bus.ack(message)  # dropped, and counted: not to be sent again
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
        inbound = self._inbound
        while True:
            due = self._rebirth_due
            if due is None:
                message, bus = await inbound.get()
            elif (wait := due - time.monotonic()) > 0:
                try:
                    message, bus = await asyncio.wait_for(inbound.get(), wait)
                except TimeoutError:
                    continue
            else:
                self._rebirth_due = None
                await self._rebirth_now("coalesced requests")
                continue
            owned = False
            try:
                owned = await self._dispatch(message, bus)
            except Exception as exc:  # a bug of ours: that message is lost, not the service
                self._handler_failed("dispatch", message.topic, exc)
            if not owned:
                bus.ack(message)

    async def _dispatch(self, message: Message, bus: Bus) -> bool:
        """Hand ``message`` to its handlers; True if one of them now owns its ack."""
        if not message.payload:
            # A zero-length message deletes a retained one (uns-schema/README.md): on a
            # death topic the clear a birth sends first; elsewhere it carries nothing to
            # handle, so it is counted.
            if not message.topic.endswith("/death"):
                self.metrics.drop("empty")
            return False
        if message.topic == self.cmd_topic:
            await self._node_command(message)
            return False
        if self.shard is not None:
            live = set(self.shard.live)
            if self.shard.observe(message.topic, message.retain):
                if self.shard.live != live:
                    await self._reclaim()
                return False
            if not self.shard.owns(message.topic):
                return False  # another replica's device
        owned = False
        ack = _Ack(bus, message) if self.running and self.running.persistent_session else None
        for sub in self._subs:
            if not matches(sub.topic_filter, message.topic):
                continue
            try:
                payload = p.decode(message.payload, sub.kind)
            except PayloadError as exc:
                self.metrics.drop("decode")
                self._throttled.warning(
                    "decode",
                    "%s: dropped undecodable message on %.200s: %s",
                    self.id,
                    message.topic,
                    exc,
                )
                continue
            self._check_version(message.topic, payload)
            started = time.perf_counter()
            try:
                if ack is None:
                    await sub.handler(Inbound(message.topic, payload, message.retain))
                else:
                    await sub.handler(
                        Inbound(message.topic, payload, message.retain, ack, message.dup)
                    )
                    owned = True
            except Reject as exc:
                self.metrics.drop(exc.reason)
                self._throttled.warning(
                    f"reject-{exc.reason}",
                    "%s: dropped message on %.200s: %s",
                    self.id,
                    message.topic,
                    exc,
                )
            except Exception as exc:
                self._handler_failed(sub.handler, message.topic, exc)
            finally:
                self.metrics.handler_seconds.labels(self.service).observe(
                    time.perf_counter() - started
                )
        return owned

    def _handler_failed(self, handler: object, topic: str, exc: Exception) -> None:
        """A bug met one message: that message is dropped and counted, the traceback logged
        at most once per interval per handler and exception type, and the service goes on."""
        self.metrics.drop("error")
        self.metrics.handler_errors.labels(self.service).inc()
        name = handler if isinstance(handler, str) else getattr(handler, "__qualname__", "?")
        self._throttled.log(
            logging.ERROR,
            f"error-{name}-{type(exc).__name__}",
            "%s: %s failed on a message on %.200s, which is dropped (a bug: counted in"
            " uns_handler_errors_total): %s: %s",
            self.id,
            name,
            topic,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def _check_version(self, topic: str, payload: object) -> None:
        """A newer schema version is decoded by the evolution rules: counted and logged."""
        v = getattr(payload, "v", p.SCHEMA_VERSION)
        if isinstance(v, int) and v > p.SCHEMA_VERSION:
            self.metrics.newer_version.labels(self.service).inc()
            self._throttled.warning(
                "version",
                "%s: message on %.200s has schema version %d, newer than this service's %d:"
                " handled by the forward-compatibility rules (its unknown fields ignored)",
                self.id,
                topic,
                v,
                p.SCHEMA_VERSION,
            )

    def _reply_problem(self, reply_to: object) -> str:
        """Why ``args.reply_to`` is not a topic this node answers on ('' when it is).

        A reply goes under ``uns-cli/{node_id}/`` (`reply_prefix`: the broker's ACL lets
        only this node publish there) or the node's own ``{enterprise}/{site}/``, but never
        on a device or node topic: a command must not make a node publish into the contract.
        """
        if not isinstance(reply_to, str):
            return f"is a {type(reply_to).__name__}, not a topic"
        if not reply_to:
            return "is empty"
        if "+" in reply_to or "#" in reply_to or "\x00" in reply_to:
            return "has a wildcard or a NUL character"
        try:
            size = len(reply_to.encode("utf-8"))
        except UnicodeEncodeError:
            return "is not valid UTF-8"
        if size > MAX_REPLY_TOPIC_BYTES:
            return f"is longer than {MAX_REPLY_TOPIC_BYTES} bytes"
        levels = reply_to.split("/")
        if "" in levels:
            return "has an empty level"
        own = f"{self.enterprise}/{self.site}/"
        replies = reply_prefix(self.id)
        if not reply_to.startswith((own, replies)):
            return f"is outside {own} and {replies}"
        if reply_to.startswith(own):
            try:
                parse(reply_to)
            except TopicError:
                if levels[2] != NODE_LEVEL:
                    return ""
            return "is a device or node topic of the namespace"
        return ""

    async def _node_command(self, message: Message) -> None:
        try:
            command: p.Command = p.decode(message.payload, p.Command)
        except PayloadError as exc:
            self.metrics.drop("decode")
            self._throttled.warning("decode", "%s: dropped undecodable command: %s", self.id, exc)
            return
        self._check_version(message.topic, command)
        reply_to = command.args.get("reply_to")
        if reply_to is not None and (problem := self._reply_problem(reply_to)):
            self.metrics.drop("reply_to")
            self._throttled.warning(
                "reply_to",
                "%s: refused command %.64r from %.64r: its args.reply_to %.200r %s",
                self.id,
                command.name,
                command.sender,
                reply_to,
                problem,
            )
            return
        reply = p.Reply(ts=p.now_ms(), id=command.id)
        if command.name == "rebirth":
            due_in_s = await self._rebirth_requested(command.sender)
            reply = p.Reply(ts=p.now_ms(), id=command.id, result={"rebirth_in_s": due_in_s})
        elif self.running is not None:
            try:
                result = await self.running.on_node_command(command)
                reply = p.Reply(ts=p.now_ms(), id=command.id, result=result)
            except Reject as exc:
                self.metrics.drop(exc.reason)
                self._throttled.warning(
                    f"reject-{exc.reason}",
                    "%s: command %.64r refused: %s",
                    self.id,
                    command.name,
                    exc,
                )
                reply = p.Reply(ts=p.now_ms(), id=command.id, ok=False, error=str(exc))
            except Exception as exc:
                self._handler_failed(self.running.on_node_command, message.topic, exc)
                reply = p.Reply(
                    ts=p.now_ms(), id=command.id, ok=False, error="internal error (see its log)"
                )
        if isinstance(reply_to, str):
            try:
                data = p.encode(reply)
            except (TypeError, ValueError, OverflowError) as exc:  # a result JSON cannot carry
                self._handler_failed("the reply's encoding", message.topic, exc)
                return
            # checked by _reply_problem: a reply goes where the command asked, in scope or not
            await self._outbox.put((reply_to, data, 1, False), self.connected)

    async def _rebirth_requested(self, sender: str) -> float:
        """Rebirth now, or at the end of the rate limit's window; the seconds until then.

        One rebirth costs every birth of the node (hundreds of kB, forwarded to the cloud):
        a burst of requests must not multiply that. The first request within the window
        is served at its end, the others are coalesced into it and counted.
        """
        now = time.monotonic()
        if self._rebirth_due is not None:
            self.metrics.drop("rebirth_rate")
            self._throttled.warning(
                "rebirth_rate",
                "%s: rebirth requested by %.64r within %g s of the last: coalesced with the"
                " one due (counted as rebirth_rate)",
                self.id,
                sender or "someone",
                self.settings.rebirth_min_interval_s,
            )
            return round(self._rebirth_due - now, 3)
        due = self._last_rebirth + self.settings.rebirth_min_interval_s
        if now >= due:
            await self._rebirth_now(f"requested by {(sender or 'someone')[:64]!r}")
            return 0.0
        self._rebirth_due = due
        log.info(
            "%s: rebirth requested by %.64r: due in %.1f s (at most one per %g s)",
            self.id,
            sender or "someone",
            due - now,
            self.settings.rebirth_min_interval_s,
        )
        return round(due - now, 3)

    async def _rebirth_now(self, why: str) -> None:
        log.info("%s: rebirth (%s)", self.id, why)
        self._last_rebirth = time.monotonic()
        try:
            await self.rebirth()
        except Exception as exc:  # the service's on_rebirth
            self._handler_failed("on_rebirth", self.cmd_topic, exc)
