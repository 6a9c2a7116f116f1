"""`uns.bus.connect(clean_session=False, manual_ack=True)` against a real Mosquitto: what
a consumer has not acknowledged, and what is published while it is away, is delivered
again when it comes back under the same id; what it acknowledged is not. The bridge's
store-and-forward (issue 15 item 7) rests on this."""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
import pytest

from fixtures.brokers import Mosquitto
from uns import Inbound, Node, Reject, Service, connect
from uns.bus import Bus, Message
from uns.runtime import ServiceSettings
from uns.testing import running

pytestmark = pytest.mark.integration


async def take(bus: Bus, n: int) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(20):
        async for message in bus.messages():
            got.append(message)
            if len(got) == n:
                return got
    return got


@pytest.mark.parametrize("protocol", [4, 5])
async def test_an_unacknowledged_message_and_one_sent_while_away_come_again(
    mosquitto: Mosquitto, protocol: Literal[4, 5]
) -> None:
    session = {"clean_session": False, "manual_ack": True, "protocol": protocol}
    async with connect(mosquitto.url, client_id="keeper", **session) as keeper:  # type: ignore[arg-type]
        await keeper.subscribe("t/#", qos=1)
        async with connect(mosquitto.url, client_id="plant") as plant:
            await plant.publish("t/a", b"1", qos=1)
            await plant.publish("t/b", b"2", qos=1)
        first, second = await take(keeper, 2)
        assert (first.payload, second.payload) == (b"1", b"2")
        assert not first.dup and first.mid
        keeper.ack(first)  # kept; the second is not (a crash before its commit)
    async with connect(mosquitto.url, client_id="plant") as plant:
        await plant.publish("t/c", b"3", qos=1)  # while the consumer is away
    async with connect(mosquitto.url, client_id="keeper", **session) as keeper:  # type: ignore[arg-type]
        await keeper.subscribe("t/#", qos=1)
        again, away = await take(keeper, 2)
        assert (again.payload, again.dup) == (b"2", True), "sent again, marked DUP"
        assert (away.payload, away.dup) == (b"3", False), "kept for us while we were away"
        keeper.ack(again)
        keeper.ack(away)
    async with connect(mosquitto.url, client_id="keeper", **session) as keeper:  # type: ignore[arg-type]
        await keeper.subscribe("t/#", qos=1)
        async with connect(mosquitto.url, client_id="plant") as plant:
            await plant.publish("t/d", b"4", qos=1)
        (after,) = await take(keeper, 1)
        assert after.payload == b"4", "an acknowledged message is not sent again"


async def test_a_clean_session_keeps_nothing(mosquitto: Mosquitto) -> None:
    async with connect(mosquitto.url, client_id="forgetful") as bus:
        await bus.subscribe("t/#", qos=1)
        async with connect(mosquitto.url, client_id="plant") as plant:
            await plant.publish("t/a", b"1", qos=1)
        (first,) = await take(bus, 1)
        bus.ack(first)  # a no-op without manual_ack: acknowledged on receipt
    async with connect(mosquitto.url, client_id="plant") as plant:
        await plant.publish("t/b", b"2", qos=1)
    async with connect(mosquitto.url, client_id="forgetful") as bus:
        await bus.subscribe("t/#", qos=1)
        async with connect(mosquitto.url, client_id="plant") as plant:
            await plant.publish("t/c", b"3", qos=1)
        (only,) = await take(bus, 1)
        assert only.payload == b"3"


class Keeper(Service[ServiceSettings]):
    """A store-and-forward service: acknowledges a message once it has kept it."""

    name = "keeper"
    persistent_session = True

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.seen: list[tuple[bytes, bool]] = []
        self.changed = asyncio.Event()
        node.subscribe("+/+/+/+/+/+/features/#", msgspec.Raw, self.take, qos=1)

    async def take(self, msg: Inbound[msgspec.Raw]) -> None:
        body = bytes(msg.payload)
        self.seen.append((body, msg.redelivered))
        self.changed.set()
        if body == b'"reject"':
            raise Reject("topic", "refused")
        if body == b'"error"':
            raise RuntimeError("a bug")
        if body != b'"hold"':  # "hold": received, not yet kept when the process ends
            msg.ack()

    async def until(self, body: bytes) -> None:
        async with asyncio.timeout(20):
            while body not in (b for b, _ in self.seen):
                self.changed.clear()
                await self.changed.wait()


async def test_a_persistent_service_gets_again_only_what_no_handler_kept(
    mosquitto: Mosquitto,
) -> None:
    topic = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
    async with running(Keeper, mosquitto.url, "acme") as node:
        first: Keeper = node.running  # type: ignore[assignment]
        async with connect(mosquitto.url, client_id="plant") as plant:
            for body in (b'"reject"', b'"error"', b'"keep"', b'"hold"'):
                await plant.publish(topic, body, qos=1)
        await first.until(b'"hold"')
    async with connect(mosquitto.url, client_id="plant") as plant:
        await plant.publish(topic, b'"away"', qos=1)  # while it is down
    async with running(Keeper, mosquitto.url, "acme") as node:
        second: Keeper = node.running  # type: ignore[assignment]
        async with connect(mosquitto.url, client_id="plant") as plant:
            await plant.publish(topic, b'"after"', qos=1)
        await second.until(b'"after"')
        # rejected, failed and kept messages were acknowledged; the held one comes again
        assert second.seen == [(b'"hold"', True), (b'"away"', False), (b'"after"', False)]
