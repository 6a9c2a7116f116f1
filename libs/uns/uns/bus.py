"""The MQTT bus: the only module that imports aiomqtt.

``connect(url)`` is an ``async with`` that yields a `Bus`; incoming messages are
an ``async for`` over ``bus.messages()``. ``memory://name`` URLs give the
in-memory bus (`uns.membus`) with the same semantics, for fast service tests.
Every aiomqtt/paho error is translated here into `BusError`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from uns.config import BrokerSettings, parse_broker_url
from uns.errors import BusError, ConfigError
from uns.topics import matches

log = logging.getLogger(__name__)

T = TypeVar("T")


class Message:
    """A message as received from the broker (``user_properties``: MQTT 5 only).

    ``mid`` is its packet id (QoS 1 and 2), what `Bus.ack` acknowledges; ``dup`` is set
    when the broker sends it again (a persistent session resumed before we acked it)."""

    __slots__ = ("dup", "mid", "payload", "qos", "retain", "topic", "user_properties")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        user_properties: dict[str, str] | None = None,
        mid: int = 0,
        dup: bool = False,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.user_properties = user_properties or {}
        self.mid = mid
        self.dup = dup

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, retain={self.retain})"


class Will:
    """The message the broker publishes for us if we vanish without a clean disconnect."""

    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


class Bus(Protocol):
    """What services see of the broker."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        """Send a message; with ``qos=1`` return once the broker acknowledged it.

        ``user_properties`` travel with MQTT 5 connections and are ignored on 3.1.1.
        """
        ...

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...

    def messages(self) -> AsyncIterator[Message]: ...

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message of a ``manual_ack`` connection (PUBACK); until then
        the broker keeps it and, in a persistent session, sends it again after a reconnect.
        A no-op for QoS 0, without ``manual_ack``, or once the connection is gone."""
        ...


# The packet id paho gave the last publish of the current task (see _watch_pubacks).
_LAST_MID: contextvars.ContextVar[int] = contextvars.ContextVar("uns_bus_last_mid", default=-1)


class _MqttBus:
    def __init__(
        self,
        client: aiomqtt.Client,
        url: str,
        protocol: int = 4,
        publish_timeout_s: float | None = None,
        *,
        manual_ack: bool = False,
        dups: set[int] | None = None,
    ) -> None:
        self._client = client
        self._url = url
        self._filters: set[str] = set()
        self._v5 = protocol == 5
        self._refused: dict[int, ReasonCode] = {}
        self._publish_timeout = publish_timeout_s
        self._manual_ack = manual_ack
        self._dups = dups if dups is not None else set()
        # aiomqtt resolves this future when the connection drops, but a publish or a
        # subscribe waiting for its acknowledgement is not told: it waited for its timeout
        # (10 s) on a dead connection, so a client kept away 10 s more after a broker
        # restart. Every operation here also ends when the connection does.
        lost = getattr(client, "_disconnected", None)
        self._lost: asyncio.Future[None] | None = lost if isinstance(lost, asyncio.Future) else None
        if self._v5:
            self._watch_pubacks()

    def ack(self, message: Message) -> None:
        if not self._manual_ack or message.qos == 0:
            return
        paho: Any = getattr(self._client, "_client", None)
        if paho is not None:
            paho.ack(message.mid, message.qos)  # not connected: paho drops it, the broker resends

    async def _unless_lost(self, operation: Coroutine[Any, Any, T], what: str) -> T:
        """Run ``operation``; raise `BusError` at once if the connection drops meanwhile."""
        lost = self._lost
        if lost is None:
            return await operation
        if lost.done():
            operation.close()
            raise BusError(f"{what} failed: connection to {self._url} lost")
        task = asyncio.ensure_future(operation)
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        raise BusError(f"{what} failed: connection to {self._url} lost")

    def _watch_pubacks(self) -> None:
        """MQTT 5 brokers may refuse a QoS 1 message with a failure PUBACK (0x87 not
        authorized, 0x97 quota exceeded); aiomqtt 2.5 reports it as success. Wrap paho's
        callbacks so `publish` can raise instead of reporting the message delivered."""
        paho: Any = getattr(self._client, "_client", None)
        if paho is None:  # not the aiomqtt we know: keep its behaviour
            return
        inner_on_publish = paho.on_publish
        inner_publish = paho.publish
        refused = self._refused

        def on_publish(client: Any, userdata: Any, mid: int, code: Any, props: Any) -> None:
            if isinstance(code, ReasonCode) and code.is_failure:
                refused[mid] = code
            else:
                refused.pop(mid, None)
            inner_on_publish(client, userdata, mid, code, props)

        def publish(*args: Any, **kwargs: Any) -> Any:
            info = inner_publish(*args, **kwargs)
            _LAST_MID.set(info.mid)  # runs in the publishing task, before its first await
            return info

        paho.on_publish = on_publish
        paho.publish = publish

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        properties = None
        if user_properties and self._v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = list(user_properties.items())
        await self._unless_lost(
            self._publish(topic, payload, qos, retain, properties), f"publish to {self._url}"
        )

    async def _publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Any
    ) -> None:
        try:
            await self._client.publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                properties=properties,
                timeout=self._publish_timeout,
            )
        except aiomqtt.MqttError as exc:
            raise BusError(f"publish to {self._url} failed: {exc}") from None
        if self._refused:  # (the packet id was noted in this task: see _watch_pubacks)
            code = self._refused.pop(_LAST_MID.get(), None)
            if code is not None:
                raise BusError(f"{self._url} refused the message on {topic!r}: {code}")

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None:
        known = topic_filter in self._filters
        self._filters.add(topic_filter)  # before: retained messages may beat the SUBACK
        try:
            granted = await self._unless_lost(
                self._client.subscribe(topic_filter, qos=qos), f"subscribe to {topic_filter!r}"
            )
        except aiomqtt.MqttError as exc:
            if not known:
                self._filters.discard(topic_filter)
            raise BusError(f"subscribe to {topic_filter!r} failed: {exc}") from None
        except BusError:
            if not known:
                self._filters.discard(topic_filter)
            raise
        code = granted[0] if granted else 0
        if code.is_failure if isinstance(code, ReasonCode) else code >= 0x80:
            if not known:
                self._filters.discard(topic_filter)
            raise BusError(f"the broker refused the subscription to {topic_filter!r}")

    async def unsubscribe(self, topic_filter: str) -> None:
        try:
            await self._unless_lost(
                self._client.unsubscribe(topic_filter), f"unsubscribe from {topic_filter!r}"
            )
            self._filters.discard(topic_filter)
        except aiomqtt.MqttError as exc:
            raise BusError(f"unsubscribe from {topic_filter!r} failed: {exc}") from None

    async def messages(self) -> AsyncIterator[Message]:
        try:
            async for m in self._client.messages:
                topic = m.topic.value
                # amqtt 0.12 sends a new client the retained messages of *every* client's
                # subscriptions; deliver only what we subscribed to, as MQTT says.
                dup = m.mid in self._dups
                if dup:
                    self._dups.discard(m.mid)
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                props = getattr(m.properties, "UserProperty", None) if m.properties else None
                message = Message(
                    topic,
                    payload,
                    qos=m.qos,
                    retain=m.retain,
                    user_properties=dict(props) if props else None,
                    mid=m.mid,
                    dup=dup,
                )
                if not any(matches(f, topic) for f in self._filters):
                    log.debug("ignored %s: not subscribed to it", topic)
                    self.ack(message)
                    continue
                yield message
        except aiomqtt.MqttError as exc:
            raise BusError(f"connection to {self._url} lost: {exc}") from None


class _ClientLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log for one connection. Until the broker accepted us, a socket error (a TLS
    alert: our certificate refused) is kept for the exception rather than logged, so a
    failed connect says why instead of 'timed out'."""

    def __init__(self) -> None:
        super().__init__(log, {})
        self.connected = False
        self.failure: str | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.ERROR:  # paho logs every packet at DEBUG: keep that cheap
            if self.logger.isEnabledFor(level):
                super().log(level, msg, *args, **kwargs)
            return
        if not self.connected and not kwargs:
            self.failure = str(msg) % args if args else str(msg)
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


def _watch_dups(client: aiomqtt.Client) -> set[int]:
    """aiomqtt 2.5 drops paho's DUP flag; a persistent session's consumer needs it to
    recognise a message the broker sends again (it may have kept it already). Installed
    before the connect: a resumed session's first messages can come with the CONNACK."""
    dups: set[int] = set()
    paho: Any = getattr(client, "_client", None)
    if paho is None:
        return dups
    inner_on_message = paho.on_message

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.dup and message.qos:
            dups.add(message.mid)
        inner_on_message(client, userdata, message)

    paho.on_message = on_message
    return dups


def _tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file and settings.key_file:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"broker.cert_file/key_file: cannot load them: {exc}") from None
    return context


def _no_delay(client: aiomqtt.Client) -> None:
    """Send each MQTT packet at once. paho leaves Nagle's algorithm on, so a small message
    behind one not yet acknowledged waits for the peer's delayed ACK (40 ms on Linux):
    measured as a 40 ms floor on the vibration pipeline's latency (uns bench)."""
    paho: Any = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("TCP_NODELAY not available on this socket")


@asynccontextmanager
async def connect(
    url: str | None = None,
    *,
    client_id: str | None = None,
    will: Will | None = None,
    settings: BrokerSettings | None = None,
    timeout_s: float = 10.0,
    protocol: Literal[4, 5] = 4,
    max_inflight: int | None = None,
    publish_timeout_s: float | None = None,
    clean_session: bool = True,
    session_expiry_s: int = 86_400,
    manual_ack: bool = False,
) -> AsyncIterator[Bus]:
    """Connect to the broker at ``url`` (or ``settings.url``) for the body of the block.

    ``protocol``: 4 is MQTT 3.1.1, 5 is MQTT 5 (user properties, reason codes).
    ``max_inflight``: QoS 1 messages sent and not yet acknowledged (paho's default: 20);
    that many concurrent `Bus.publish` calls are in flight at once.
    ``timeout_s`` bounds connecting and each acknowledgement; ``publish_timeout_s``, when
    given, replaces it for publishing (``math.inf``: wait as long as the connection lives,
    which keepalive bounds: a slow broker is not a dead one, and tearing the connection
    down loses what the sockets still hold).
    ``clean_session=False`` (give a stable ``client_id``): the broker keeps our
    subscriptions and queues QoS 1 messages while we are away (MQTT 5: for
    ``session_expiry_s``). ``manual_ack``: a QoS 1 message is acknowledged only by
    `Bus.ack`, so one we have not kept yet is sent again after a crash.
    Every operation fails at once when the connection drops.
    Raises `BusError` when the broker is unreachable or the connection drops.
    """
    settings = settings or BrokerSettings()
    target = parse_broker_url(url or settings.url)
    if target.scheme == "memory":
        from uns.membus import MemoryBroker

        # no sessions in memory: a test of a persistent session needs a real broker
        async with MemoryBroker.named(target.host).connect(client_id=client_id, will=will) as bus:
            yield bus
        return
    username, password = settings.credentials()
    username = target.username or username
    password = target.password or password
    client_log = _ClientLog()
    session: dict[str, Any] = {}
    if protocol == 5:
        session["clean_start"] = clean_session
        if not clean_session:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = session_expiry_s
            session["properties"] = connect_props
    else:
        session["clean_session"] = clean_session
    client = aiomqtt.Client(
        target.host,
        target.port,
        # an explicit id: amqtt would hand an anonymous client another one's leftover session
        identifier=client_id or f"uns-{uuid.uuid4().hex[:12]}",
        username=username,
        password=password,
        will=aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if will
        else None,
        keepalive=settings.keepalive_s,
        timeout=timeout_s,
        tls_context=_tls_context(settings) if target.tls else None,
        logger=client_log,  # type: ignore[arg-type]
        protocol=aiomqtt.ProtocolVersion.V5 if protocol == 5 else aiomqtt.ProtocolVersion.V311,
        max_inflight_messages=max_inflight,
        **session,
    )
    dups: set[int] | None = None
    if manual_ack:
        paho: Any = getattr(client, "_client", None)
        if paho is not None:
            paho.manual_ack_set(True)
        dups = _watch_dups(client)
    if max_inflight is not None:  # aiomqtt warns past 10 concurrent publishes by default
        client.pending_calls_threshold = max_inflight + 10
    try:
        async with client:
            client_log.connected = True
            _no_delay(client)
            yield _MqttBus(
                client,
                str(target),
                protocol,
                publish_timeout_s,
                manual_ack=manual_ack,
                dups=dups,
            )
    except aiomqtt.MqttError as exc:
        cause = client_log.failure if not client_log.connected and client_log.failure else exc
        raise BusError(f"broker {target} unreachable: {cause}") from None
    except OSError as exc:  # DNS failure or refused TLS before MQTT says anything
        raise BusError(f"broker {target} unreachable: {exc}") from None
