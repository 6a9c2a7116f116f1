"""The runtime against real brokers under faults: a stuck loop, a broker restarted under
running nodes, a broker that stops reading, a connection cut mid-stream.

A TCP proxy (`fixtures.proxy.Proxy`) sits between a node and the broker when the fault
is the network's: it can stop forwarding, or reset every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fixtures.logs import capturing_logs
from fixtures.proxy import Proxy
from uns import (
    Command,
    DevicePath,
    Inbound,
    Metric,
    MetricDef,
    Node,
    Service,
    ServiceSettings,
    connect,
    decode,
    encode,
)
from uns.errors import BusError
from uns.supervisor import Child, supervise
from uns.testing import running, watching
from uns.watchdog import WATCHDOG_EXIT_CODE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


# ---- a service whose handler blocks the event loop, as its own process -------------------

STUCK_SERVICE = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    from uns import Command, DevicePath, Node, Service, ServiceSettings
    from uns.config import Namespace, UnsConfig

    class Stuck(Service[ServiceSettings]):
        name = "stuck"

        def __init__(self, node):
            super().__init__(node)
            path = DevicePath(node.enterprise, node.site, "a", "l", "c", "d")
            node.subscribe(path.topic("cmd", "block"), Command, self.on_block)

        async def on_block(self, msg):
            time.sleep(3600)  # the bug: a blocking call on the event loop

    async def main():
        url, enterprise, node_id, watchdog_s = sys.argv[1:5]
        settings = ServiceSettings(
            node_id=node_id, metrics_port=0, loop_watchdog_s=float(watchdog_s)
        )
        config = UnsConfig(namespace=Namespace(enterprise=enterprise))
        node = Node("stuck", settings, config, broker_url=url)
        await node.serve(Stuck(node), asyncio.Event())

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main())
    """
)


def stuck_argv(tmp_path: Path, url: str, prefix: str, node_id: str, watchdog_s: float) -> list[str]:
    script = tmp_path / "stuck_service.py"
    script.write_text(STUCK_SERVICE)
    return [sys.executable, str(script), url, prefix, node_id, str(watchdog_s)]


def block_command(prefix: str) -> tuple[str, bytes]:
    path = DevicePath(prefix, "pune", "a", "l", "c", "d")
    return path.topic("cmd", "block"), encode(Command(ts=1, name="block"))


async def test_a_service_whose_handler_blocks_the_loop_logs_where_publishes_its_death_and_exits(
    amqtt_broker, prefix, tmp_path
):
    argv = stuck_argv(tmp_path, amqtt_broker.url, prefix, "stuck-01", 2.0)
    async with watching(amqtt_broker.url, f"{prefix}/pune/_node/stuck-01/#") as w:
        proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        try:
            await w.wait_topic("/birth", timeout=60)
            topic, payload = block_command(prefix)
            async with connect(amqtt_broker.url) as pub:
                await pub.publish(topic, payload, qos=1)
            death = await w.wait_topic("/death", timeout=60)  # its Last Will
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert death.node == "stuck-01"
    assert proc.returncode == WATCHDOG_EXIT_CODE
    text = err.decode()
    assert "stuck-01: the event loop has not run for" in text
    assert "time.sleep(3600)" in text  # the stack says where the loop is stuck
    assert "Traceback" not in text


async def test_uns_up_kills_and_restarts_a_child_whose_loop_is_stuck(
    amqtt_broker, prefix, tmp_path
):
    # its own watchdog off: the supervisor's liveness check is what finds it
    child = Child("stuck", stuck_argv(tmp_path, amqtt_broker.url, prefix, "stuck-02", 0))
    stop = asyncio.Event()
    with capturing_logs("uns.supervisor", timeout=90) as logs:
        async with watching(amqtt_broker.url, f"{prefix}/pune/_node/stuck-02/#") as w:
            supervisor = asyncio.create_task(supervise(None, [child], stop=stop, liveness_s=3))
            try:
                await w.wait_topic("/birth", timeout=60)
                topic, payload = block_command(prefix)
                async with connect(amqtt_broker.url) as pub:
                    await pub.publish(topic, payload, qos=1)
                await w.wait_topic("/death", timeout=60)  # killed: the broker says so
                reborn = await w.wait_topic("/birth", timeout=60)  # and it is back
            finally:
                stop.set()
                await asyncio.wait_for(supervisor, 60)
    assert child.restarts >= 1
    assert reborn.node == "stuck-02"
    stuck_lines = [
        r.getMessage() for r in logs.of("uns.supervisor") if "is stuck" in r.getMessage()
    ]
    assert len(stuck_lines) == 1
    assert "stuck (pid" in stuck_lines[0] and "has not run for" in stuck_lines[0]


# ---- a broker restarted under running nodes ---------------------------------------------


class Station(Service[ServiceSettings]):
    """A node with two devices and a wildcard subscription, as inference and the bridge
    have (so that a connecting client has retained births to be sent)."""

    name = "station"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        base = (node.enterprise, node.site, "a", "l", node.id)
        self.paths = [DevicePath(*base, "d1"), DevicePath(*base, "d2")]
        node.subscribe(f"{node.enterprise}/{node.site}/+/+/+/+/raw/birth", Any, self.seen)
        node.subscribe(f"{node.enterprise}/{node.site}/a/l/{node.id}/+/cmd/+", Any, self.seen)

    async def seen(self, msg: Inbound[Any]) -> None:
        pass

    async def run(self) -> None:
        for path in self.paths:
            await self.node.device_birth(path, "raw", [MetricDef(name="n", datatype="int32")])


def births(node: Node[Any]) -> float:
    value = node.metrics.registry.get_sample_value(
        "uns_births_published_total", {"service": node.service}
    )
    return value or 0.0


@asynccontextmanager
async def stations(url: str, prefix: str, n: int) -> AsyncIterator[list[Node[Any]]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(running(Station, url, prefix, node_id=f"st-{i}"))
            for i in range(n)
        ]
        yield nodes


async def _restart_and_time(
    nodes: list[Node[Any]], url: str, prefix: str, stop: Any, start: Any, down_s: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Stop the broker, keep it away ``down_s``, start it; the seconds until each node's
    birth, and how many node births each published in the 5 s after its first."""
    before = {n.id: births(n) for n in nodes}
    await stop()
    await asyncio.sleep(down_s)  # away long enough for the nodes' backoff to reach its cap
    await start()
    started = time.monotonic()
    back: dict[str, float] = {}
    seen: dict[str, int] = {n.id: 0 for n in nodes}
    async with watching(url, f"{prefix}/pune/_node/+/birth") as w:
        deadline = started + 60
        while len(back) < len(nodes) and time.monotonic() < deadline:
            m = await w.wait_for(lambda m: m.topic.endswith("/birth"), timeout=60)
            node_id = m.topic.split("/")[3]
            seen[node_id] += 1
            back.setdefault(node_id, time.monotonic() - started)
        try:  # a second birth of any node within 5 s would be a birth sent twice
            again = await w.wait_for(lambda m: m.topic.endswith("/birth"), timeout=5)
            seen[again.topic.split("/")[3]] += 1
        except TimeoutError:
            pass
    for n in nodes:  # counted once per reconnect: one node birth and its two devices
        assert births(n) - before[n.id] == 3, f"{n.id}: births counted {births(n) - before[n.id]}"
    return back, seen


async def test_after_an_amqtt_restart_every_node_is_back_within_the_bound_with_births_once(
    amqtt_broker, prefix
):
    with capturing_logs("uns") as logs:
        async with stations(amqtt_broker.url, prefix, 4) as nodes:
            back, seen = await _restart_and_time(
                nodes, amqtt_broker.url, prefix, amqtt_broker.stop, amqtt_broker.start, 8.0
            )
    bound = ServiceSettings().reconnect_max_s + 3.0  # the backoff's cap, then connecting
    assert len(back) == 4 and max(back.values()) <= bound, back
    assert set(seen.values()) == {1}, seen
    problems = [
        r
        for r in logs.records
        if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()
    ]
    assert not problems, [r.getMessage() for r in problems]


async def test_after_a_mosquitto_restart_every_node_is_back_within_the_bound_with_births_once(
    mosquitto, prefix
):
    async def stop() -> None:
        mosquitto.kill()

    async def start() -> None:
        await asyncio.to_thread(mosquitto.start)

    with capturing_logs("uns") as logs:
        async with stations(mosquitto.url, prefix, 4) as nodes:
            back, seen = await _restart_and_time(nodes, mosquitto.url, prefix, stop, start, 8.0)
    bound = ServiceSettings().reconnect_max_s + 3.0
    assert len(back) == 4 and max(back.values()) <= bound, back
    assert set(seen.values()) == {1}, seen
    problems = [r for r in logs.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]


# ---- a broker that stops reading; a connection cut mid-stream ---------------------------


class Streamer(Service[ServiceSettings]):
    """Publishes ``total`` data messages of about 1.5 kB on one stream, as fast as the node
    takes them (so the sockets fill when the broker stops reading), and relays every input
    command it gets as one features message (as the featurizer turns raw into features)."""

    name = "streamer"
    total = 6000
    stream = "raw"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.path = DevicePath(node.enterprise, node.site, "a", "l", "c", "d")
        self.accepted = 0
        self.pad = [Metric(name=f"m{i}", value=float(i)) for i in range(100)]
        node.subscribe(self.path.topic("cmd", "input"), Command, self.on_input, qos=1)

    async def on_input(self, msg: Inbound[Command]) -> None:
        n = msg.payload.args["n"]
        await self.node.device_data(self.path, "features", [Metric(name="n", value=n)])

    async def run(self) -> None:
        defs = [MetricDef(name="n", datatype="int64")]
        await self.node.device_birth(self.path, self.stream, defs)
        for i in range(self.total):
            await self.node.device_data(
                self.path, self.stream, [Metric(name="n", value=i), *self.pad]
            )
            self.accepted += 1
            if i % 20 == 0:
                await asyncio.sleep(0.001)


class FeatureStreamer(Streamer):
    name = "fstreamer"
    total = 2000
    stream = "features"


async def _collect(url: str, topic_filter: str, into: set[int]) -> None:
    async with connect(url) as bus:
        await bus.subscribe(topic_filter, qos=1)
        async for m in bus.messages():
            into.add(decode(m.payload).metrics[0].value)


async def _until(predicate: Any, timeout: float) -> None:
    """Poll a counter of the node or of the test, which no event announces."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_a_broker_that_stops_reading_past_the_publish_timeout_loses_nothing(
    mosquitto, prefix
):
    """Before: after 10 s without progress the publish 'timed out' and the node tore a
    working connection down; its clean session lost what the broker held for it (the
    inputs sent meanwhile: never relayed, nothing counted)."""
    raw: set[int] = set()
    relayed: set[int] = set()
    base = f"{prefix}/+/+/+/+/+"
    collectors = [
        asyncio.create_task(_collect(mosquitto.url, f"{base}/raw/data", raw)),
        asyncio.create_task(_collect(mosquitto.url, f"{base}/features/data", relayed)),
    ]
    inputs = DevicePath(prefix, "pune", "a", "l", "c", "d").topic("cmd", "input")

    async def send_inputs(bus: Any, numbers: range) -> None:
        for n in numbers:
            await bus.publish(inputs, encode(Command(ts=1, name="input", args={"n": n})), qos=1)

    try:
        async with (
            Proxy(mosquitto.port) as proxy,
            running(Streamer, proxy.url, prefix) as node,
            connect(mosquitto.url) as feeder,
        ):
            streamer = node.running
            await send_inputs(feeder, range(0, 100))
            await _until(lambda: streamer.accepted > 200, 60)
            proxy.freeze()
            await _until(lambda: len(node._outbox.items) > 100, 60)  # the sockets are full
            await send_inputs(feeder, range(100, 200))  # held by the broker for the node
            await asyncio.sleep(12)  # past aiomqtt's 10 s publish timeout
            proxy.thaw()
            await send_inputs(feeder, range(200, 300))
            await _until(lambda: streamer.accepted == streamer.total, 120)
            await asyncio.wait_for(node.drained(), 60)
            with contextlib.suppress(TimeoutError):  # the asserts below say what is missing
                await _until(lambda: len(relayed) == 300 and len(raw) == streamer.total, 30)
    finally:
        for c in collectors:
            c.cancel()
    assert relayed == set(range(300))
    assert raw == set(range(Streamer.total))
    assert node.metrics.dropped_count("offline") == 0


async def test_a_cut_connection_loses_no_qos_1_message_the_in_flight_one_is_sent_again(
    mosquitto, prefix
):
    got: set[int] = set()
    topic_filter = f"{prefix}/+/+/+/+/+/features/data"
    collector = asyncio.create_task(_collect(mosquitto.url, topic_filter, got))
    try:
        async with (
            Proxy(mosquitto.port) as proxy,
            running(FeatureStreamer, proxy.url, prefix) as node,
        ):
            streamer = node.running
            for share in (0.2, 0.4, 0.6):  # three cuts while messages are in flight
                await _until(lambda s=share: streamer.accepted > s * streamer.total, 120)
                proxy.reset()
            await _until(lambda: streamer.accepted == streamer.total, 120)
            await asyncio.wait_for(node.drained(), 120)
            with contextlib.suppress(TimeoutError):  # the asserts below say what is missing
                await _until(lambda: len(got) == streamer.total, 30)
    finally:
        collector.cancel()
    assert got == set(range(FeatureStreamer.total))
    assert node.metrics.dropped_count("offline") == 0


async def test_a_subscribe_on_a_connection_that_drops_fails_at_once_not_at_its_timeout(
    mosquitto,
):
    """After an amqtt restart a client's SUBSCRIBE went unanswered on a connection the
    broker had closed: the client waited its whole timeout before reconnecting."""
    async with Proxy(mosquitto.port) as proxy:
        proxy.close_on = b"\x82"  # the client's SUBSCRIBE: the broker hangs up
        async with connect(proxy.url, timeout_s=60) as bus:
            started = time.monotonic()
            with pytest.raises(BusError, match="lost"):
                await bus.subscribe("a/b", qos=1)
            took = time.monotonic() - started
    assert took < 30  # (the acknowledgement's timeout is 60 s here)


async def test_births_never_interleave_with_data_in_flight_sequence_numbers_stay_consecutive(
    mosquitto, prefix
):
    """Up to 20 publishes are in flight at once; a rebirth (births published around the
    queue) waits until they are acknowledged, so that after a node birth (seq 0) and its
    device births every data message continues the new sequence."""
    seen: list[tuple[str, int]] = []

    async def record() -> None:
        async with connect(mosquitto.url) as bus:
            await bus.subscribe(f"{prefix}/#", qos=1)
            async for m in bus.messages():
                if m.payload and m.topic.rsplit("/", 1)[1] in ("birth", "data"):
                    seen.append((m.topic.rsplit("/", 1)[1], decode(m.payload).seq))

    recorder = asyncio.create_task(record())
    try:
        async with (
            running(FeatureStreamer, mosquitto.url, prefix, rebirth_min_interval_s=0) as node,
            connect(mosquitto.url) as pub,
        ):
            streamer = node.running
            for share in (0.2, 0.4, 0.6, 0.8):
                await _until(lambda s=share: streamer.accepted > s * streamer.total, 120)
                await pub.publish(node.cmd_topic, encode(Command(ts=1, name="rebirth")), qos=1)
            await _until(lambda: streamer.accepted == streamer.total, 120)
            await asyncio.wait_for(node.drained(), 120)
            with contextlib.suppress(TimeoutError):
                await _until(lambda: sum(k == "data" for k, _ in seen) >= streamer.total, 30)
    finally:
        recorder.cancel()
    births = [i for i, (kind, seq) in enumerate(seen) if kind == "birth" and seq == 0]
    assert len(births) >= 5  # the first and four rebirths
    for (_, a), (_, b) in itertools.pairwise(seen):
        if b != 0:  # a node birth starts the sequence again
            assert b == (a + 1) % 256, f"seq {a} then {b}"
