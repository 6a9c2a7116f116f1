"""The embedded broker (amqtt 0.12.1) under the races met when clients reconnect together.

A raw MQTT 3.1.1 client (a few packets written by hand) plays the client that amqtt
mistreats, because our bus would hide what the broker sends: it filters what it did not
subscribe to, and it reads its socket at once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from fixtures.brokers import AmqttBroker
from fixtures.ports import free_port
from uns import connect
from uns_broker import AclEntry

pytestmark = pytest.mark.integration


@pytest.fixture
async def acl_broker() -> AsyncIterator[AmqttBroker]:
    """The embedded broker with ACLs, as on an edge box: amqtt then awaits a plugin for
    every message it routes, so its routing falls behind what it has read."""
    everything = AclEntry(publish=["#"], subscribe=["#"])
    broker = AmqttBroker(free_port(), acl={"anonymous": everything})
    await broker.start()
    yield broker
    await broker.stop()


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id)
    return b"\x10" + _length(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic_filter) + b"\x01"
    return b"\x82" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + _length(len(body)) + body


class RawClient:
    """One TCP connection speaking MQTT by hand; reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unread: list[tuple[int, bytes]] = []

    @classmethod
    async def open(cls, port: int, client_id: str) -> RawClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast unread
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        client = cls(reader, writer)
        await client.send(connect_packet(client_id))
        kind, body = await client.packet()
        assert kind == 0x20 and body[1] == 0, "CONNACK refused"
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def packet(self) -> tuple[int, bytes]:
        """(type nibble << 4, body); (0, b'') at end of stream."""
        if self.unread:
            return self.unread.pop(0)
        first = await self.reader.read(1)
        if not first:
            return 0, b""
        n, shift = 0, 0
        while True:
            (byte,) = await self.reader.readexactly(1)
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first[0] & 0xF0, await self.reader.readexactly(n)

    async def until_suback(self, packet_id: int) -> list[str]:
        """Topics of the PUBLISHes read before the SUBACK of ``packet_id``."""
        topics = []
        while True:
            kind, body = await self.packet()
            if kind == 0:
                raise AssertionError(
                    f"the broker closed the connection without answering SUBSCRIBE {packet_id}"
                    f" (after {len(topics)} messages)"
                )
            if kind == 0x90 and struct.unpack("!H", body[:2])[0] == packet_id:
                assert body[2] < 0x80, "subscription refused"
                return topics
            if kind == 0x30:
                (size,) = struct.unpack("!H", body[:2])
                topics.append(body[2 : 2 + size].decode())

    def close(self) -> None:
        self.writer.close()


async def test_a_client_that_connects_while_others_subscribe_gets_its_subscription_answered(
    amqtt_broker, prefix
):
    """The race behind 'dictionary changed size during iteration' (amqtt/broker.py:601):
    a slow connect overlapping another client's new subscription. Before the fix the
    broker's task for the new client died: its SUBSCRIBE was never answered."""
    async with connect(amqtt_broker.url) as owner:
        await owner.subscribe(f"{prefix}/big/#", qos=1)
        blob = bytes(128 * 1024)
        for i in range(48):  # 6 MB retained under a filter someone holds
            await owner.publish(f"{prefix}/big/{i}", blob, qos=1, retain=True)
        slow = await RawClient.open(amqtt_broker.port, f"{prefix}-slow")
        try:
            await slow.send(subscribe_packet(1, f"{prefix}/mine/#"))
            # The old broker starts pushing those 6 MB at once and waits for this client to
            # read them (one 128 kB message read here, the rest block it); the fixed one
            # answers the SUBSCRIBE.
            slow.unread.append(await asyncio.wait_for(slow.packet(), 30))
            async with connect(amqtt_broker.url) as other:
                await other.subscribe(f"{prefix}/new/#", qos=1)  # a filter the broker lacked
            topics = await asyncio.wait_for(slow.until_suback(1), 60)
        finally:
            slow.close()
    assert not [t for t in topics if t.startswith(f"{prefix}/big/")]


async def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(amqtt_broker, prefix):
    async with connect(amqtt_broker.url) as owner:
        await owner.subscribe(f"{prefix}/theirs/#", qos=1)
        await owner.publish(f"{prefix}/theirs/birth", b"not for you", qos=1, retain=True)
        await owner.publish(f"{prefix}/mine/birth", b"for you", qos=1, retain=True)
        client = await RawClient.open(amqtt_broker.port, f"{prefix}-new")
        try:
            await client.send(subscribe_packet(1, f"{prefix}/mine/#"))
            before = await asyncio.wait_for(client.until_suback(1), 30)
            kind, body = await asyncio.wait_for(client.packet(), 30)
        finally:
            client.close()
    assert before == []  # amqtt 0.12.1 sent prefix/theirs/birth here, unasked
    assert kind == 0x30 and f"{prefix}/mine/birth".encode() in body


async def test_what_a_client_published_just_before_disconnecting_is_routed(acl_broker, prefix):
    """Like `mosquitto_pub`: PUBLISH then DISCONNECT at once. amqtt queued the messages for
    routing (and acknowledged those at QoS 1), then dropped the queue at the DISCONNECT:
    99 of these 200 were lost."""
    n = 200
    async with connect(acl_broker.url) as sub:
        await sub.subscribe(f"{prefix}/rows", qos=1)
        client = await RawClient.open(acl_broker.port, f"{prefix}-pub")
        packets = b"".join(
            publish_packet(f"{prefix}/rows", str(i).encode(), qos=i % 2, packet_id=i + 1)
            for i in range(n)
        )
        await client.send(packets + b"\xe0\x00")  # ... and DISCONNECT, in one write
        got: list[bytes] = []

        async def collect() -> None:
            async for m in sub.messages():
                got.append(m.payload)
                if len(got) == n:
                    return

        try:
            await asyncio.wait_for(collect(), 20)
        except TimeoutError:
            pass
        finally:
            client.close()
    assert len(got) == n, f"{n - len(got)} of {n} messages published before DISCONNECT lost"
    assert got == [str(i).encode() for i in range(n)]


async def test_the_broker_stops_promptly_while_clients_vanish_with_messages_to_route(prefix):
    """Waiting for a client's messages to be routed must not hold up a shutdown (an early
    version of the workaround made amqtt wait for ever for the client's reader)."""
    everything = AclEntry(publish=["#"], subscribe=["#"])
    broker = AmqttBroker(free_port(), acl={"anonymous": everything})
    await broker.start()
    packets = b"".join(
        publish_packet(f"{prefix}/rows", str(i).encode(), qos=1, packet_id=i + 1)
        for i in range(200)
    )
    for k in range(5):
        client = await RawClient.open(broker.port, f"{prefix}-gone-{k}")
        await client.send(packets)
        client.writer.transport.abort()  # gone without a DISCONNECT
    try:
        await asyncio.wait_for(broker.stop(), 30)
    except TimeoutError:
        pytest.fail("the broker did not stop within 30 s")
