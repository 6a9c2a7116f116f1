"""The MQTT bus: the only module that imports aiomqtt.

``connect(url)`` is an ``async with`` that yields a `Bus`; incoming messages are
an ``async for`` over ``bus.messages()``. ``memory://name`` URLs give the
in-memory bus (`uns.membus`) with the same semantics, for fast service tests.
Every aiomqtt/paho error is translated here into `BusError`.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from uns.config import BrokerSettings, parse_broker_url
from uns.errors import BusError, ConfigError
from uns.topics import matches

log = logging.getLogger(__name__)


class Message:
    """A message as received from the broker."""

    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain

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
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None: ...

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...

    def messages(self) -> AsyncIterator[Message]: ...


class _MqttBus:
    def __init__(self, client: aiomqtt.Client, url: str) -> None:
        self._client = client
        self._url = url
        self._filters: set[str] = set()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BusError(f"publish to {self._url} failed: {exc}") from None

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None:
        known = topic_filter in self._filters
        self._filters.add(topic_filter)  # before: retained messages may beat the SUBACK
        try:
            granted = await self._client.subscribe(topic_filter, qos=qos)
        except aiomqtt.MqttError as exc:
            if not known:
                self._filters.discard(topic_filter)
            raise BusError(f"subscribe to {topic_filter!r} failed: {exc}") from None
        code = granted[0] if granted else 0
        if code.is_failure if isinstance(code, ReasonCode) else code >= 0x80:
            if not known:
                self._filters.discard(topic_filter)
            raise BusError(f"the broker refused the subscription to {topic_filter!r}")

    async def unsubscribe(self, topic_filter: str) -> None:
        try:
            await self._client.unsubscribe(topic_filter)
            self._filters.discard(topic_filter)
        except aiomqtt.MqttError as exc:
            raise BusError(f"unsubscribe from {topic_filter!r} failed: {exc}") from None

    async def messages(self) -> AsyncIterator[Message]:
        try:
            async for m in self._client.messages:
                topic = m.topic.value
                # amqtt 0.12 sends a new client the retained messages of *every* client's
                # subscriptions; deliver only what we subscribed to, as MQTT says.
                if not any(matches(f, topic) for f in self._filters):
                    log.debug("ignored %s: not subscribed to it", topic)
                    continue
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                yield Message(topic, payload, qos=m.qos, retain=m.retain)
        except aiomqtt.MqttError as exc:
            raise BusError(f"connection to {self._url} lost: {exc}") from None


def _tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file and settings.key_file:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"broker.cert_file/key_file: cannot load them: {exc}") from None
    return context


@asynccontextmanager
async def connect(
    url: str | None = None,
    *,
    client_id: str | None = None,
    will: Will | None = None,
    settings: BrokerSettings | None = None,
    timeout_s: float = 10.0,
) -> AsyncIterator[Bus]:
    """Connect to the broker at ``url`` (or ``settings.url``) for the body of the block.

    Raises `BusError` when the broker is unreachable or the connection drops.
    """
    settings = settings or BrokerSettings()
    target = parse_broker_url(url or settings.url)
    if target.scheme == "memory":
        from uns.membus import MemoryBroker

        async with MemoryBroker.named(target.host).connect(client_id=client_id, will=will) as bus:
            yield bus
        return
    username, password = settings.credentials()
    username = target.username or username
    password = target.password or password
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
        logger=log,
    )
    try:
        async with client:
            yield _MqttBus(client, str(target))
    except aiomqtt.MqttError as exc:
        raise BusError(f"broker {target} unreachable: {exc}") from None
    except OSError as exc:  # DNS failure or refused TLS before MQTT says anything
        raise BusError(f"broker {target} unreachable: {exc}") from None
