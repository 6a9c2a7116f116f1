"""An in-memory broker with real MQTT wildcard, retained and Last Will semantics.

It makes service tests fast; the contract tests in ``tests/`` run the same
assertions against it, amqtt and Mosquitto so it cannot drift from them. A test
can ``stop()`` and ``start()`` it to exercise reconnects without a network.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

from uns.bus import Message, Will
from uns.errors import BusError
from uns.topics import matches, validate_filter


class _Client:
    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.filters: dict[str, int] = {}
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self.open = True

    def _check(self) -> None:
        if not self.open:
            raise BusError(f"connection to memory://{self.broker.name} lost")

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        self._check()
        if not topic or "+" in topic or "#" in topic:
            raise BusError(f"invalid topic to publish to: {topic!r}")
        self.broker.route(
            topic, bytes(payload), qos=qos, retain=retain, user_properties=user_properties
        )

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None:
        self._check()
        validate_filter(topic_filter)
        self.filters[topic_filter] = qos
        for topic, (payload, rqos) in list(self.broker.retained.items()):
            if matches(topic_filter, topic):
                self.queue.put_nowait(Message(topic, payload, qos=min(qos, rqos), retain=True))

    async def unsubscribe(self, topic_filter: str) -> None:
        self._check()
        self.filters.pop(topic_filter, None)

    def ack(self, message: Message) -> None:
        """In memory a message is delivered when queued: nothing to acknowledge."""

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            message = await self.queue.get()
            if message is None:
                raise BusError(f"connection to memory://{self.broker.name} lost")
            yield message

    def deliver(
        self, topic: str, payload: bytes, qos: int, user_properties: dict[str, str] | None = None
    ) -> None:
        granted = [q for f, q in self.filters.items() if matches(f, topic)]
        if granted:
            self.queue.put_nowait(
                Message(
                    topic,
                    payload,
                    qos=min(qos, max(granted)),
                    user_properties=dict(user_properties) if user_properties else None,
                )
            )

    def drop(self) -> None:
        self.open = False
        self.queue.put_nowait(None)


class MemoryBroker:
    """A broker living in this process, found by name (``memory://name``)."""

    _registry: ClassVar[dict[str, MemoryBroker]] = {}
    _ids: ClassVar = itertools.count(1)

    def __init__(self, name: str) -> None:
        self.name = name
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.clients: dict[str, _Client] = {}
        self.running = True

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The broker of that name, created on first use."""
        if name not in cls._registry:
            cls._registry[name] = cls(name)
        return cls._registry[name]

    def route(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        """Deliver to every matching subscriber (user properties as MQTT 5 would; a
        retained copy keeps only the payload)."""
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        for client in list(self.clients.values()):
            client.deliver(topic, payload, qos, user_properties)

    @asynccontextmanager
    async def connect(
        self, *, client_id: str | None = None, will: Will | None = None
    ) -> AsyncIterator[_Client]:
        if not self.running:
            raise BusError(f"broker memory://{self.name} unreachable: connection refused")
        client_id = client_id or f"memory-client-{next(self._ids)}"
        previous = self.clients.pop(client_id, None)
        if previous is not None:  # MQTT: a second connection with the same id takes over
            self._lose(previous)
        client = _Client(self, client_id, will)
        self.clients[client_id] = client
        try:
            yield client
        finally:  # like aiomqtt: leaving the block, even by an exception, disconnects cleanly
            if self.clients.get(client_id) is client:
                del self.clients[client_id]
                client.drop()

    def sever(self, client_id: str) -> None:
        """The client's process died or its network went: the broker fires its will."""
        client = self.clients.pop(client_id)
        self._lose(client)

    def _lose(self, client: _Client) -> None:
        was_open = client.open
        client.drop()
        if was_open and client.will is not None:
            w = client.will
            self.route(w.topic, w.payload, qos=w.qos, retain=w.retain)

    def stop(self) -> None:
        """Die like a broker without persistence: drop every connection, forget retained
        messages, refuse new connections until `start`. Nobody is left to fire wills."""
        self.running = False
        self.retained.clear()
        for client in list(self.clients.values()):
            del self.clients[client.client_id]
            client.drop()

    def start(self) -> None:
        self.running = True

    def client_ids(self) -> list[str]:
        return sorted(self.clients)
