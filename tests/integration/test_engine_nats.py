"""The services on NATS (its MQTT listener, JetStream on) unchanged (issue 14 item 1): the
pipeline end to end, the runtime's births, deaths and Last Will, a restart of the server,
and, where NATS 2.9 differs from what MQTT brokers give, what uns does about it (the
README's engine table rests on these)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.collect import collect_until
from fixtures.nats import NatsMqtt, started_nats
from fixtures.ports import free_port
from uns import (
    BusError,
    DeviceBirth,
    DevicePath,
    Inbound,
    MetricDef,
    Node,
    NodeBirth,
    NodeDeath,
    Service,
    ServiceSettings,
    connect,
    decode,
)
from uns.errors import TopicError
from uns.testing import running, watching
from uns.topics import check_slug
from uns_featurizer import Featurizer
from uns_inference import Inference
from uns_modbus_adapter import ModbusAdapter
from uns_opcua_adapter import OpcUaAdapter
from uns_simulator import Simulator, adapter_config

# on the worker of the session's NATS under pytest-xdist (conftest's any_broker "nats")
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("nats")]

ROOT = Path(__file__).parents[2]


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsMqtt]:
    """A NATS of the test's own, for a test that stops it (the session's stays up)."""
    server = started_nats(tmp_path)
    yield server
    server.stop()


# ---- the pipeline -----------------------------------------------------------------------


async def test_simulated_machines_are_read_featurized_and_scored_on_nats(
    nats_mqtt: NatsMqtt, prefix: str, tmp_path: Path
) -> None:
    url = nats_mqtt.url
    base = f"{prefix}/pune/stamping/line-3"
    devices = [(f"{base}/cell-a/press-01", "press"), (f"{base}/cell-b/robot-01", "robot")]
    opcua_port, modbus_port = free_port(), free_port()
    sections = adapter_config(
        [(DevicePath.parse(p), a) for p, a in devices],
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=modbus_port,
        rate_hz=10_000.0,
    )
    async with (
        watching(url, f"{prefix}/#") as w,
        running(
            Simulator,
            url,
            prefix,
            plant=devices,
            tick_s=0.05,
            opcua={"port": opcua_port},
            modbus={"port": modbus_port},
        ) as sim,
    ):
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        async with (
            running(OpcUaAdapter, url, prefix, **sections["opcua-adapter"]),
            running(ModbusAdapter, url, prefix, reconnect_max_s=0.5, **sections["modbus-adapter"]),
            running(Featurizer, url, prefix, plant=devices),
            running(
                Inference,
                url,
                prefix,
                plant=devices,
                models_dir=str(ROOT / "models"),
                pubkey=str(ROOT / "keys/models.pub"),
                audit_log=str(tmp_path / "audit.jsonl"),
            ),
        ):
            scored: set[str] = set()

            def every_device_scored() -> bool:
                scored.update(
                    m.topic.removesuffix("/scores/data")
                    for m in w.messages
                    if m.topic.endswith("/scores/data") and m.payload
                )
                return scored == {d for d, _ in devices}

            await w.wait(every_device_scored, 90)
    by_topic = {m.topic: m for m in w.messages if m.payload}
    for device, _ in devices:
        for stream in ("raw", "features", "scores"):
            birth = decode(by_topic[f"{device}/{stream}/birth"].payload, DeviceBirth)
            assert birth.metrics, (device, stream)
    nodes = {m.topic.split("/")[3] for m in w.messages if "/_node/" in m.topic}
    assert {"simulator", "opcua-adapter", "modbus-adapter", "featurizer", "inference"} <= nodes


# ---- the runtime's births, deaths and Last Will -----------------------------------------


class Station(Service[ServiceSettings]):
    """A node with two devices (retained births) and a wildcard subscription."""

    name = "station"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        base = (node.enterprise, node.site, "a", "l", node.id)
        self.paths = [DevicePath(*base, "d1"), DevicePath(*base, "d2")]
        node.subscribe(f"{node.enterprise}/{node.site}/+/+/+/+/raw/birth", Any, self.seen)

    async def seen(self, msg: Inbound[Any]) -> None:
        pass

    async def run(self) -> None:
        for path in self.paths:
            await self.node.device_birth(path, "raw", [MetricDef(name="n", datatype="int32")])


CRASHING_STATION = textwrap.dedent(
    """
    import asyncio, sys
    from uns import DevicePath, MetricDef, Node, Service, ServiceSettings
    from uns.config import Namespace, UnsConfig

    class Station(Service[ServiceSettings]):
        name = "station"

        async def run(self):
            for d in ("d1", "d2"):
                path = DevicePath(self.node.enterprise, self.node.site, "a", "l", "doomed", d)
                await self.node.device_birth(path, "raw", [MetricDef(name="n", datatype="int32")])

    async def main():
        url, enterprise = sys.argv[1:3]
        config = UnsConfig(namespace=Namespace(enterprise=enterprise))
        settings = ServiceSettings(node_id="doomed", metrics_port=0)
        node = Node("station", settings, config, broker_url=url)
        await node.serve(Station(node), asyncio.Event())

    asyncio.run(main())
    """
)


async def test_a_late_consumer_on_nats_sees_births_retained_and_a_killed_node_dies_by_its_will(
    nats_mqtt: NatsMqtt, prefix: str, tmp_path: Path
) -> None:
    url = nats_mqtt.url
    node_topic = f"{prefix}/pune/_node/doomed"
    script = tmp_path / "station.py"
    script.write_text(CRASHING_STATION)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), url, prefix)
    try:
        async with watching(url, f"{prefix}/#") as w:
            await w.wait_for(lambda m: m.topic.endswith("/d2/raw/birth"), 30)
        async with connect(url) as late:  # joins after the births: the broker holds them
            await late.subscribe(f"{prefix}/#", qos=1)
            await late.subscribe(f"{prefix}-end", qos=1)
            await late.publish(f"{prefix}-end", b"", qos=1)
            held = await collect_until(late, f"{prefix}-end")
        proc.kill()
        await proc.wait()
        async with watching(url, f"{node_topic}/death") as w:  # retained, or the will itself
            death = await w.next(f"{node_topic}/death", NodeDeath, 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    retained = {m.topic: m for m in held if m.retain}
    birth = decode(retained[f"{node_topic}/birth"].payload, NodeBirth)
    assert {f"{prefix}/pune/a/l/doomed/d{i}/raw/birth" for i in (1, 2)} <= set(retained)
    assert death.node == "doomed" and death.bdseq == birth.bdseq  # the will of that session


async def test_after_a_nats_restart_its_retained_births_are_there_and_the_nodes_are_back(
    own_nats: NatsMqtt, prefix: str
) -> None:
    """``gone`` stops before the server is killed and started again, so only the broker can
    give its births after it (JetStream's store); ``live`` runs across it, reconnects and
    is born again."""
    url = own_nats.url
    async with running(Station, url, prefix, node_id="live") as live:
        async with watching(url, f"{prefix}/#") as w:
            async with running(Station, url, prefix, node_id="gone"):
                await w.wait(lambda: sum(m.topic.endswith("/raw/birth") for m in w.messages) == 4)
            await w.wait_for(lambda m: m.topic.endswith("/gone/death"))
        before = {m.topic: m.payload for m in w.messages if "/birth" in m.topic}
        own_nats.kill()  # a crash: no clean shutdown of JetStream either
        await asyncio.to_thread(own_nats.start)
        restarted = time.monotonic()
        async with watching(url, f"{prefix}/pune/_node/live/birth") as w:
            reborn = await w.wait_for(
                lambda m: (
                    decode(m.payload, NodeBirth).bdseq != decode(before[m.topic], NodeBirth).bdseq
                ),
                60,
            )
        back_s = time.monotonic() - restarted
        async with connect(url) as late:
            await late.subscribe(f"{prefix}/+/a/l/gone/+/raw/birth", qos=1)
            await late.subscribe(f"{prefix}/+/_node/gone/+", qos=1)
            await late.subscribe(f"{prefix}-end", qos=1)
            await late.publish(f"{prefix}-end", b"", qos=1)
            kept = await collect_until(late, f"{prefix}-end")
        assert live.connected.is_set()
    retained = {m.topic: m.payload for m in kept if m.retain}
    assert set(retained) == {
        *(f"{prefix}/pune/a/l/gone/d{i}/raw/birth" for i in (1, 2)),
        f"{prefix}/pune/_node/gone/birth",
        f"{prefix}/pune/_node/gone/death",
    }
    for topic, payload in retained.items():  # the very messages from before the restart
        if "/birth" in topic:
            assert payload == before[topic], topic
    assert decode(retained[f"{prefix}/pune/_node/gone/death"], NodeDeath).reason == "shutdown"
    bound = ServiceSettings().reconnect_max_s + 3.0
    assert back_s <= bound, back_s
    assert reborn.topic == f"{prefix}/pune/_node/live/birth"


# ---- where NATS 2.9 differs, and what uns does about it ---------------------------------


async def test_nats_refuses_mqtt_5_and_the_bridge_says_to_use_3_1_1(nats_mqtt: NatsMqtt) -> None:
    """The runtime speaks MQTT 3.1.1 (`uns.connect`'s default), so every service runs on
    NATS; the bridge's presets that speak MQTT 5 to a remote are told why it failed."""
    from uns_bridge.logic import explain

    with pytest.raises(BusError) as refused:
        async with connect(nats_mqtt.url, protocol=5, timeout_s=5):
            pass
    assert "unsupported protocol version" in str(refused.value).lower()
    assert "remote.protocol: 4 is MQTT 3.1.1" in (explain(str(refused.value)) or "")
    async with connect(nats_mqtt.url, timeout_s=5):  # 3.1.1: accepted
        pass


async def test_qos_2_on_nats_is_granted_as_qos_1_and_a_qos_2_publish_is_a_bus_error(
    nats_mqtt: NatsMqtt, prefix: str
) -> None:
    """uns never asks for QoS 2 (at most once and at least once are what it relies on);
    a user's QoS 2 publish fails loudly, never silently lost."""
    url = nats_mqtt.url
    async with connect(url) as sub:
        await sub.subscribe(f"{prefix}/q2", qos=2)  # accepted: NATS grants QoS 1
        async with connect(url) as pub:
            await pub.publish(f"{prefix}/q2", b"once", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(sub.messages()))
        with pytest.raises(BusError, match="lost"):  # NATS closes the connection
            async with connect(url) as pub:
                await pub.publish(f"{prefix}/q2", b"exactly once", qos=2)
    assert (message.payload, message.qos) == (b"once", 1)


async def test_shared_subscriptions_are_literal_topics_on_nats(
    nats_mqtt: NatsMqtt, prefix: str
) -> None:
    """``$share/group/filter`` is accepted but names a topic of its own: members get
    nothing of ``filter``. uns never uses it: replicas split devices by rendezvous
    hashing over retained node births and Last Wills (`uns.shard`), shown above on NATS."""
    url = nats_mqtt.url
    async with connect(url) as member:
        await member.subscribe(f"$share/g/{prefix}/#", qos=1)
        await member.subscribe(f"{prefix}-end", qos=1)
        async with connect(url) as pub:
            await pub.publish(f"{prefix}/x", b"for the group", qos=1)
            await pub.publish(f"{prefix}-end", b"", qos=1)
        got = await collect_until(member, f"{prefix}-end")
    assert got == []


async def test_dots_and_spaces_close_the_connection_on_nats_and_uns_topics_never_have_them(
    nats_mqtt: NatsMqtt, prefix: str
) -> None:
    """NATS maps MQTT's '/' to its '.': a topic with '.' or ' ' is refused (the connection
    closed, a filter's SUBACK a failure). uns topics are slugs, which cannot carry either;
    Sparkplug B's ``spBv1.0/...`` can, so the Sparkplug service needs another broker."""
    url = nats_mqtt.url
    for level in ("v1.0", "a b"):
        with pytest.raises(TopicError):
            check_slug(level)
        with pytest.raises(BusError, match="lost"):
            async with connect(url) as pub:
                await pub.publish(f"{prefix}/{level}/data", b"x", qos=1)
    async with connect(url) as sub:
        with pytest.raises(BusError, match="refused the subscription"):
            await sub.subscribe("spBv1.0/group/#", qos=1)
        await sub.subscribe(f"{prefix}/ok", qos=1)  # the connection is still good
        async with connect(url) as pub:
            await pub.publish(f"{prefix}/ok", b"fine", qos=1)
        async with asyncio.timeout(10):
            assert (await anext(aiter(sub.messages()))).payload == b"fine"


async def test_a_persistent_session_on_nats_keeps_messages_across_a_restart_and_resends_late(
    tmp_path: Path, prefix: str
) -> None:
    """What a persistent session (the bridge's) gets on NATS: QoS 1 messages published
    while it is away, kept across a server restart; but one received and not acknowledged
    is sent again only after ``ack_wait`` (30 s by default, 2 s here), not at once when the
    session resumes as Mosquitto does; flagged DUP (`Message.dup`) all the same, so the
    bridge's journal still recognises a message it had already taken."""
    server = started_nats(tmp_path, mqtt='ack_wait: "2s"')
    url, topic = server.url, f"{prefix}/kept"
    try:
        async with connect(url, client_id="keeper", clean_session=False) as bus:
            await bus.subscribe(topic, qos=1)
        async with connect(url) as pub:
            for payload in (b"while away", b"unacked"):
                await pub.publish(topic, payload, qos=1)
        server.restart()
        async with connect(url, client_id="keeper", clean_session=False, manual_ack=True) as bus:
            await bus.subscribe(topic, qos=1)  # as the runtime does on every connection
            messages = aiter(bus.messages())
            async with asyncio.timeout(10):
                first = await anext(messages)
                bus.ack(first)
                second = await anext(messages)  # not acknowledged: the session ends so
        resumed = time.monotonic()
        async with connect(url, client_id="keeper", clean_session=False, manual_ack=True) as bus:
            await bus.subscribe(topic, qos=1)
            async with asyncio.timeout(20):
                again = await anext(aiter(bus.messages()))
            late_s = time.monotonic() - resumed
            bus.ack(again)
    finally:
        server.stop()
    assert (first.payload, second.payload, again.payload) == (b"while away", b"unacked", b"unacked")
    assert late_s >= 1.0, late_s  # after ack_wait, not at once when the session resumed
    assert again.dup


async def test_a_client_leaving_a_qos_1_subscription_to_everything_stalls_nats_and_nodes_retry(
    own_nats: NatsMqtt, prefix: str
) -> None:
    """NATS 2.9.10: when a client with a QoS 1 ``#`` (or ``+/#``: NATS's own ``$JS``
    subjects match it) disconnects, the server's MQTT session handling waits out a 4 s
    JetStream timeout, and a client connecting meanwhile waits for it, or is refused. The
    services never subscribe at the top level (their filters start with the enterprise); a
    node caught by it (here: connecting right after a viewer's ``uns sub '#'``) is born
    late, after a retry if it was refused."""
    url = own_nats.url
    async with connect(url) as viewer:
        await viewer.subscribe("#", qos=1)
    left = time.monotonic()
    async with running(Station, url, prefix, node_id="after-viewer"):
        connected_s = time.monotonic() - left
    assert 3.0 <= connected_s <= 10.0 + ServiceSettings().reconnect_max_s + 3.0, connected_s
    assert "timeout for request type" in own_nats.logs()
