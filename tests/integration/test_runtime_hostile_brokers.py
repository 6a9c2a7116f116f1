"""Hostile commands and the `#` contract against real brokers (issue 15, items 1, 3, 15).

The fast cases are in tests/unit/test_runtime_hostile.py on the in-memory bus; here the
same attacks go through amqtt and Mosquitto, whose client library (paho) refuses to
publish to a wildcard topic with an exception the in-memory bus does not raise, and a
plain aiomqtt client plays the new app that subscribes to `#` and validates everything
it sees with jsonschema.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest

from uns import (
    Command,
    DevicePath,
    Metric,
    MetricDef,
    Node,
    Reply,
    Service,
    ServiceSettings,
    connect,
    encode,
    matches,
)
from uns.testing import running, watching

pytestmark = pytest.mark.integration

SCHEMA_DIR = Path(__file__).parents[2] / "uns-schema"


class Target(Service[ServiceSettings]):
    """One device; answers 'status' node commands."""

    name = "target"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.path = DevicePath(node.enterprise, node.site, "area", "line", "cell", "target-01")
        self.rebirths = 0

    async def run(self) -> None:
        await self.node.device_birth(self.path, "raw", [MetricDef(name="n", datatype="int32")])
        await self.node.device_data(self.path, "raw", [Metric(name="n", value=1)])

    async def on_rebirth(self) -> None:
        self.rebirths += 1

    async def on_node_command(self, command: Command) -> dict[str, Any]:
        if command.name == "status":
            return {"rebirths": self.rebirths}
        return await super().on_node_command(command)


def status(reply_to: Any, id: str = "s") -> bytes:
    return encode(Command(ts=1, name="status", id=id, args={"reply_to": reply_to}))


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker_url(request: pytest.FixtureRequest) -> str:
    fixture = "amqtt_broker" if request.param == "amqtt" else "mosquitto"
    return str(request.getfixturevalue(fixture).url)


async def test_hostile_node_commands_leave_the_service_running_on_a_real_broker(broker_url, prefix):
    hostile = [
        status("#"),  # paho raised ValueError in the sender: the service died
        status(f"{prefix}/+/reply"),
        status("$SYS/broker/uptime"),
        status(""),
        status(f"{prefix}/pune/area/line/cell/target-01/raw/data"),
        b'{"type":"cmd","ts":1,"name":"status","args":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}",
        b'{"type":"cmd","ts":1,"name":"\xff"}',
    ]
    reply_to = f"uns-cli/target/{prefix}/reply"
    async with (
        running(Target, broker_url, prefix) as node,
        watching(broker_url, f"uns-cli/target/{prefix}/#") as w,
        connect(broker_url) as pub,
    ):
        for payload in hostile:
            await pub.publish(node.cmd_topic, payload, qos=1)
        await pub.publish(node.cmd_topic, status(reply_to, "after"), qos=1)
        reply = await w.wait_topic(reply_to, timeout=20)
        assert isinstance(reply, Reply) and reply.ok and reply.id == "after"
        assert node.metrics.dropped_count("reply_to") == 5
        assert node.metrics.dropped_count("decode") == 2
        assert node.connected.is_set()


async def test_a_burst_of_rebirth_requests_on_mosquitto_gives_at_most_two_rebirths(
    mosquitto, prefix
):
    url = mosquitto.url
    births = f"{prefix}/pune/_node/target/birth"
    async with (
        running(Target, url, prefix, rebirth_min_interval_s=3.0) as node,
        watching(url, f"{prefix}/#") as w,
        connect(url) as pub,
    ):
        await w.wait_for(lambda m: m.topic == births and m.retain)
        rebirth = encode(Command(ts=1, name="rebirth", sender="storm"))
        for _ in range(10):  # a burst well inside the window, even on a loaded machine
            await asyncio.gather(*(pub.publish(node.cmd_topic, rebirth, qos=1) for _ in range(10)))
        for _ in range(2):
            await w.wait_for(lambda m: m.topic == births and not m.retain, timeout=20)
        # Commands are handled in order: once this is answered, the storm is behind us.
        await pub.publish(node.cmd_topic, status(f"{prefix}/pune/replies/done"), qos=1)
        await w.wait_topic("/replies/done", timeout=20)
    reborn = [m for m in w.seen if m.topic.endswith("/birth") and not m.retain]
    assert len(reborn) == 2 * 2  # two rebirths of the node and its one device
    assert sum(len(m.payload) for m in reborn) < 2_000  # was 500 births, 1.65 MB
    assert node.metrics.dropped_count("rebirth_rate") == 98


# ---- item 15: everything on `#` is in the documented contract ---------------------------------


def documented_exceptions() -> list[str]:
    """The topic filters uns-schema/README.md says carry zero-length payloads."""
    text = (SCHEMA_DIR / "README.md").read_text()
    section = text.split("### Messages that are not payloads", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "zero bytes" in line]
    assert rows, "the README documents no zero-length message"
    return [f for row in rows for f in re.findall(r"`([^`]+)`", row.split("|")[1])]


EXPECTED_TYPE = {  # what each kind of topic may carry
    r"/_node/[^/]+/birth$": {"nbirth"},
    r"/_node/[^/]+/death$": {"ndeath"},
    r"/_node/[^/]+/cmd$": {"cmd"},
    r"/(raw|features|scores)/birth$": {"dbirth"},
    r"/(raw|features|scores)/data$": {"ddata"},
    r"/(raw|features|scores)/death$": {"ddeath"},
    r"/events/[^/]+$": {"event"},
    r"/cmd/[^/]+$": {"cmd"},
    r"^uns-cli/.*/reply$|/replies/": {"reply"},
}


class Seen(list[aiomqtt.Message]):
    """What the app received, with an awaitable 'something arrived'."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    async def wait(self, predicate: Any, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()


def payloads_with(seen: Seen, marker: bytes) -> int:
    return sum(marker in bytes(m.payload) for m in seen)  # type: ignore[arg-type]


@asynccontextmanager
async def naive_app(url: str) -> AsyncIterator[Seen]:
    """A new app as an integrator writes one: plain aiomqtt, subscribed to everything."""
    host, port = url.removeprefix("mqtt://").split(":")
    seen = Seen()
    async with aiomqtt.Client(host, int(port), identifier="naive-app") as client:
        await client.subscribe("#", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                seen.append(message)
                seen.changed.set()

        task = asyncio.create_task(collect())
        try:
            yield seen
        finally:
            task.cancel()


async def test_every_message_a_subscriber_to_everything_sees_is_in_the_contract(mosquitto, prefix):
    url = mosquitto.url
    async with naive_app(url) as seen:
        async with running(Target, url, prefix) as node, connect(url) as pub:
            service = node.running
            assert isinstance(service, Target)
            await node.device_birth(service.path, "raw", [MetricDef(name="n", datatype="int32")])
            await pub.publish(node.cmd_topic, encode(Command(ts=1, name="rebirth")), qos=1)
            await node.device_death(service.path, "raw", "gone")
            await node.drained()  # sent: a birth discards a death still queued
            await node.device_birth(service.path, "raw", [MetricDef(name="n", datatype="int32")])
            await pub.publish(node.cmd_topic, status(f"uns-cli/target/{prefix}/reply"), qos=1)
            await pub.publish(node.cmd_topic, status(f"{prefix}/pune/replies/1"), qos=1)
            await seen.wait(lambda s: payloads_with(s, b'"reply"') == 2)
        await seen.wait(lambda s: payloads_with(s, b'"shutdown"') == 1)  # the clean stop

    validator = jsonschema.Draft202012Validator(
        json.loads((SCHEMA_DIR / "payload.schema.json").read_text())
    )
    allowed_empty = documented_exceptions()
    ours = [m for m in seen if m.topic.value.startswith((prefix, f"uns-cli/target/{prefix}"))]
    empty, payloads = [], []
    for m in ours:
        topic, raw = m.topic.value, bytes(m.payload)  # type: ignore[arg-type]
        if not raw:
            assert any(matches(f, topic) for f in allowed_empty), f"undocumented empty on {topic}"
            empty.append(topic)
            continue
        document = json.loads(raw)
        validator.validate(document)  # raises, naming the path, if outside the schema
        kinds = [k for pattern, k in EXPECTED_TYPE.items() if re.search(pattern, topic)]
        assert kinds and document["type"] in kinds[0], (topic, document["type"])
        payloads.append(document["type"])
    # what the run must have shown the app, so that the checks above checked something
    assert {"nbirth", "dbirth", "ddata", "ddeath", "cmd", "reply", "ndeath"} <= set(payloads)
    assert any(t.endswith("/_node/target/death") for t in empty)
    assert any(t.endswith("/raw/death") for t in empty)
