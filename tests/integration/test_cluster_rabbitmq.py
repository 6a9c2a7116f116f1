"""The services on a three-node RabbitMQ cluster, unchanged (issue 14): the pipeline spread
over its nodes, a node killed mid-stream (its clients go on on another node, born again,
the gap visible), and what uns does about retained messages being per node there."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fixtures.ports import free_port
from fixtures.rabbitmq import RabbitCluster
from uns import (
    BusError,
    Command,
    DeviceBirth,
    DeviceData,
    DevicePath,
    Inbound,
    Node,
    NodeBirth,
    Service,
    ServiceSettings,
    connect,
    decode,
    encode,
)
from uns.bus import Message
from uns.config import BrokerSettings, Device, Namespace, Plant, UnsConfig
from uns.testing import watching
from uns_demo import DemoService
from uns_featurizer import Featurizer
from uns_inference import Inference
from uns_opcua_adapter import OpcUaAdapter
from uns_simulator import Simulator, adapter_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("rabbitmq")]

ROOT = Path(__file__).parents[2]


@asynccontextmanager
async def serving(
    service_cls: type[Service[Any]],
    urls: list[str],
    enterprise: str,
    *,
    plant: list[tuple[str, str]] | None = None,
    **settings: Any,
) -> AsyncIterator[Node[Any]]:
    """`uns.testing.running` with ``broker.urls``: the service on ``urls[0]``, the other
    nodes its fallbacks, as a config naming the whole cluster gives it."""
    config = UnsConfig(
        namespace=Namespace(enterprise=enterprise, site="pune"),
        broker=BrokerSettings(url=urls[0], urls=urls[1:]),
        plant=Plant(devices=[Device(path=p, asset=a) for p, a in plant or []]),
    )
    s = msgspec.convert({"metrics_port": 0, **settings}, service_cls.Settings)
    node: Node[Any] = Node(service_cls.name, s, config, version="test")
    stop = asyncio.Event()
    task = asyncio.create_task(node.serve(service_cls(node), stop))
    connected = asyncio.create_task(node.connected.wait())
    await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        connected.cancel()
        task.result()
    try:
        yield node
    finally:
        stop.set()
        await task


def rotated(urls: list[str], first: int) -> list[str]:
    """The cluster's URLs starting with node ``first``: a service put on that node."""
    return urls[first:] + urls[:first]


def births(messages: list[Message], node_id: str) -> list[tuple[int, NodeBirth]]:
    return [
        (i, decode(m.payload, NodeBirth))
        for i, m in enumerate(messages)
        if m.topic.endswith(f"/_node/{node_id}/birth") and m.payload
    ]


async def test_simulated_machines_are_featurized_and_scored_across_the_cluster_and_a_node_kill(
    rabbitmq_cluster: RabbitCluster, prefix: str, tmp_path: Path
) -> None:
    """Simulator and inference on node 1, the OPC UA adapter and the featurizer on node 2,
    the watcher on node 3. Node 2 is killed once scores flow: the adapter and featurizer
    go on on node 3, born again (a new bdseq; no death: the node that held their wills
    is gone), and scores come again."""
    cluster = rabbitmq_cluster
    cluster.revive()
    urls = cluster.urls
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    plant = [(device, "press")]
    opcua_port = free_port()
    sections = adapter_config(
        [(DevicePath.parse(device), "press")],
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=free_port(),
        rate_hz=10_000.0,
    )
    fast = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
    async with (
        watching(urls[2], f"{prefix}/#") as w,
        serving(
            Simulator,
            rotated(urls, 0),
            prefix,
            plant=plant,
            tick_s=0.05,
            opcua={"port": opcua_port},
            modbus={"enabled": False},
        ) as sim,
    ):
        await asyncio.wait_for(sim.running.serving.wait(), 20)  # type: ignore[union-attr]
        async with (
            serving(OpcUaAdapter, rotated(urls, 1), prefix, **fast, **sections["opcua-adapter"]),
            serving(Featurizer, rotated(urls, 1), prefix, plant=plant, **fast),
            serving(
                Inference,
                rotated(urls, 0),
                prefix,
                plant=plant,
                models_dir=str(ROOT / "models"),
                pubkey=str(ROOT / "keys/models.pub"),
                audit_log=str(tmp_path / "audit.jsonl"),
            ),
        ):
            scores = f"{device}/scores/data"
            t0 = time.monotonic()
            await w.wait_for(lambda m: m.topic == scores and bool(m.payload), 90)
            first_score_s = time.monotonic() - t0
            await w.wait_for(lambda m: m.topic == f"{device}/raw/data", 10)
            killed_at = len(w.messages)
            t_kill = time.monotonic()
            cluster.nodes[1].kill()
            for node_id in ("opcua-adapter", "featurizer"):
                await w.wait(
                    lambda n=node_id: any(i >= killed_at for i, _ in births(w.messages, n)), 30
                )  # type: ignore[misc]
            reborn_s = time.monotonic() - t_kill
            after = len(w.messages)
            await w.wait(
                lambda: any(m.topic == scores and m.payload for m in w.messages[after:]), 60
            )
            rescored_s = time.monotonic() - t_kill
    print(
        f"\nfirst score {first_score_s:.1f} s; node killed: births again on another node"
        f" {reborn_s:.1f} s, scores again {rescored_s:.1f} s after the kill"
    )
    for node_id in ("opcua-adapter", "featurizer"):
        sessions = births(w.messages, node_id)
        (_, before), (_, again) = sessions[-2], sessions[-1]
        assert again.bdseq != before.bdseq, node_id  # a new session, which consumers see
    # The gap in the raw stream is never silent. A consumer sees the adapter's data of the
    # old session (what was still on its way: consecutive seqs), then its new node birth
    # (a new bdseq) and device birth, then data numbered from that birth on.
    m = w.messages
    reborn_at = next(i for i, _ in births(m, "opcua-adapter") if i >= killed_at)
    dbirth_at = next(i for i in range(reborn_at, len(m)) if m[i].topic == f"{device}/raw/birth")
    dbirth = decode(m[dbirth_at].payload, DeviceBirth)
    seqs = [
        (i, decode(m[i].payload, DeviceData).seq)
        for i in range(len(m))
        if m[i].topic == f"{device}/raw/data" and m[i].payload
    ]
    old = [q for i, q in seqs if i < reborn_at]
    new = [q for i, q in seqs if i > dbirth_at]
    assert [(b - a) % 256 for a, b in itertools.pairwise(old[-20:])] == [1] * 19  # one session
    assert new[0] == (dbirth.seq + 1) % 256  # numbered from the new birth: the gap shows
    assert not any(reborn_at < i < dbirth_at for i, _ in seqs)  # no data between the births
    # and no death came between: the wills were held by the node that died with them
    death = "/_node/opcua-adapter/death"
    assert not any(x.topic.endswith(death) and x.payload for x in m[killed_at:reborn_at])


async def test_retained_births_are_per_node_and_a_consumer_elsewhere_asks_for_a_rebirth(
    rabbitmq_cluster: RabbitCluster, prefix: str
) -> None:
    """RabbitMQ 3.10 keeps a retained message on the node it was published to: a consumer
    on another node does not get a birth even on its exact topic. What uns does: a consumer
    that meets data without a birth asks the node for a rebirth (the inference does it on
    its own, Sparkplug-style); the births come again, live, to every node."""
    one, two = rabbitmq_cluster.urls[0], rabbitmq_cluster.urls[2]
    birth_topic = f"{prefix}/pune/_node/demo/birth"
    async with serving(DemoService, [one], prefix, interval_s=0.1):
        async with connect(two) as late:
            await late.subscribe(birth_topic, qos=1)
            await late.subscribe(f"{prefix}/end", qos=1)
            await late.publish(f"{prefix}/end", b"", qos=1)
            async with asyncio.timeout(10):
                first = await anext(late.messages())
            assert first.topic == f"{prefix}/end"  # nothing retained for it on this node
        async with connect(one) as same:  # on the node it was published to, it is there
            await same.subscribe(birth_topic, qos=1)
            async with asyncio.timeout(10):
                held = await anext(same.messages())
            assert held.topic == birth_topic and held.retain
        async with watching(two, f"{prefix}/#") as w:
            await w.wait_for(lambda m: m.topic.endswith("/raw/data"), 10)  # data, no birth
            assert not any(m.topic.endswith("/birth") for m in w.messages)
            command = Command(ts=1, name="rebirth", id="r1", sender="late-consumer")
            await w.publish(f"{prefix}/pune/_node/demo/cmd", encode(command))
            again = await w.next(birth_topic, NodeBirth)
            raw_birth = await w.wait_for(lambda m: m.topic.endswith("/raw/birth"))
    assert again.node == "demo" and raw_birth.payload


class Keeper(Service[ServiceSettings]):
    """A store-and-forward consumer (like the bridge): a persistent session whose messages
    are acknowledged once kept."""

    name = "keeper"
    persistent_session = True

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.kept: list[int] = []
        self.changed = asyncio.Event()
        node.subscribe(
            f"{node.enterprise}/pune/+/+/+/+/scores/data", DeviceData, self.on_data, qos=1
        )

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        self.kept.append(msg.payload.seq)
        msg.ack()
        self.changed.set()

    async def until(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(set(self.kept)) < n:
                self.changed.clear()
                await self.changed.wait()


async def publish_retrying(url: str, topic: str, payload: bytes, timeout: float = 30) -> None:
    """A QoS 1 publish, again on a new connection while it fails: RabbitMQ 3.10 closes a
    publisher's connection when a quorum queue the message goes to has just lost its leader
    (basic.nack), which the runtime's outbox would send again the same way."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with connect(url) as bus:
                    await bus.publish(topic, payload, qos=1)
                return
            except BusError:
                await asyncio.sleep(0.2)


async def test_a_persistent_session_outlives_its_node_with_quorum_queues(
    rabbitmq_cluster: RabbitCluster, prefix: str
) -> None:
    """The bridge's kind of session on a cluster with ``mqtt.durable_queue_type = quorum``:
    its node killed, it resumes its session on another node (same client id) and gets what
    was published meanwhile, nothing lost."""
    cluster = rabbitmq_cluster
    if boot_s := cluster.revive():  # a killed node rejoins the cluster
        print(f"\na killed node back in the cluster in {boot_s:.1f} s", end="")
    topic = f"{prefix}/pune/a/l/c/d1/scores/data"

    def message(seq: int) -> bytes:
        return encode(DeviceData(ts=1, node="scorer", seq=seq, metrics=[]))

    async with serving(
        Keeper, rotated(cluster.urls, 1), prefix, reconnect_min_s=0.1, reconnect_max_s=1.0
    ) as node:
        keeper = node.running
        assert isinstance(keeper, Keeper)
        for seq in range(5):
            await publish_retrying(cluster.urls[0], topic, message(seq))
        await keeper.until(5, 10)
        t_kill = time.monotonic()
        cluster.nodes[1].kill()
        for seq in range(5, 10):  # while it is away
            await publish_retrying(cluster.urls[0], topic, message(seq))
        await keeper.until(10, 30)
        resumed_s = time.monotonic() - t_kill
    assert set(keeper.kept) == set(range(10))
    print(
        f"\npersistent session resumed on another node, all kept, {resumed_s:.1f} s after the kill"
    )
