"""Two featurizer replicas on a real Mosquitto split the devices (issue 11 item 6): every
device's features come from exactly one replica, none is lost, and when one replica stops
its devices' features come from the survivor within a measured bound."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from fixtures.brokers import Mosquitto
from uns import Bus, DeviceBirth, DeviceData, Metric, MetricDef, connect, decode, encode, now_ms
from uns.runtime import Node
from uns.shard import owner
from uns.testing import running, watching
from uns_featurizer import Featurizer

pytestmark = pytest.mark.integration

DEVICES = [f"shard/pune/press/l1/c1/m{i}" for i in range(8)]
REPLICAS = ("featurizer-0", "featurizer-1")
SETTINGS: dict[str, Any] = {"replicas": 2, "slow": {"window_s": 0.5, "hop_s": 0.25}}
STEP_S = 0.05
"""The raw data rate: one sample per device per step (real time: windows close on it)."""
FAILOVER_BOUND_S = 5.0


async def feed(bus: Bus, stop: asyncio.Event) -> None:
    """What an adapter publishes: a birth per device, then a sample each step."""
    for device in DEVICES:
        birth = DeviceBirth(
            ts=now_ms(),
            node="adapter",
            device=device,
            bdseq=1,
            seq=0,
            metrics=[MetricDef(name="bearing_temp", datatype="float", unit="degC")],
        )
        await bus.publish(f"{device}/raw/birth", encode(birth), qos=1, retain=True)
    seq = 0
    while not stop.is_set():
        seq = (seq + 1) % 256
        for device in DEVICES:
            data = DeviceData(
                ts=now_ms(),
                node="adapter",
                seq=seq,
                metrics=[Metric(name="bearing_temp", value=50.0 + seq % 3)],
            )
            await bus.publish(f"{device}/raw/data", encode(data), qos=1)
        await asyncio.sleep(STEP_S)  # the data rate, not a wait for an event


async def until(condition: Callable[[], bool], changed: asyncio.Event, timeout: float) -> None:
    """Wait until ``condition`` holds, checked each time ``changed`` is set."""
    async with asyncio.timeout(timeout):
        while not condition():
            changed.clear()
            await changed.wait()


async def test_two_replicas_split_devices_and_fail_over(mosquitto: Mosquitto) -> None:
    url = mosquitto.url
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(watching(url, "shard/pune/+/+/+/+/features/data"))
        nodes: dict[str, Node[Any]] = {}
        replica_stacks: dict[str, AsyncExitStack] = {}
        for node_id in REPLICAS:
            s = await stack.enter_async_context(AsyncExitStack())
            replica_stacks[node_id] = s
            nodes[node_id] = await s.enter_async_context(
                running(Featurizer, url, "shard", node_id=node_id, **SETTINGS)
            )
        for node in nodes.values():  # each sees the other alive before any data
            shard = node.shard
            assert shard is not None
            await until(lambda shard=shard: shard.live == set(REPLICAS), shard.changed, 10)

        expected = {d: owner(d, frozenset(REPLICAS)) for d in DEVICES}
        assert set(expected.values()) == set(REPLICAS), "8 devices all on one replica"
        stop_feed = asyncio.Event()
        adapter = await stack.enter_async_context(connect(url))
        feeder = asyncio.create_task(feed(adapter, stop_feed))

        def producers() -> dict[str, set[str]]:
            by: dict[str, set[str]] = defaultdict(set)
            for m in w.messages:
                by[m.topic.rsplit("/", 2)[0]].add(decode(m.payload, DeviceData).node)
            return by

        def count() -> dict[str, int]:
            n: dict[str, int] = defaultdict(int)
            for m in w.messages:
                n[m.topic.rsplit("/", 2)[0]] += 1
            return n

        try:
            # every device featurized, each by its one owner
            await until(lambda: set(producers()) == set(DEVICES), w.changed, 20)
            # more windows each: a second replica featurizing a device would show by now
            await until(lambda: min(count().values()) >= 4, w.changed, 20)
            assert {d: sorted(n) for d, n in producers().items()} == {
                d: [o] for d, o in expected.items()
            }

            # featurizer-1 stops: its devices come from featurizer-0, and only those move
            moved = [d for d, o in expected.items() if o == "featurizer-1"]
            before = len(w.messages)
            stopped = time.monotonic()
            await replica_stacks["featurizer-1"].aclose()
            survivor = nodes["featurizer-0"].shard
            assert survivor is not None
            await until(
                lambda: survivor.live == {"featurizer-0"}, survivor.changed, FAILOVER_BOUND_S
            )
            handed_over = time.monotonic() - stopped

            def survivor_has_all() -> bool:
                after = {
                    m.topic.rsplit("/", 2)[0]
                    for m in w.messages[before:]
                    if decode(m.payload, DeviceData).node == "featurizer-0"
                }
                return set(moved) <= after

            await until(survivor_has_all, w.changed, FAILOVER_BOUND_S)
            failover = time.monotonic() - stopped
            print(f"handover {handed_over:.3f} s, moved devices featurized again {failover:.3f} s")
            after = producers()
            for d in DEVICES:
                assert after[d] == ({"featurizer-0"} | ({"featurizer-1"} if d in moved else set()))
        finally:
            stop_feed.set()
            await feeder
