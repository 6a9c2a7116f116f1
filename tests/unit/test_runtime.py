"""The service runtime on the in-memory bus (fast), and the key cases on amqtt too."""

from __future__ import annotations

import itertools

import pytest

from uns import (
    Command,
    DeviceBirth,
    DeviceData,
    DevicePath,
    Inbound,
    Metric,
    MetricDef,
    Node,
    NodeBirth,
    NodeDeath,
    Reject,
    Service,
    ServiceSettings,
    connect,
    encode,
)
from uns.membus import MemoryBroker
from uns.testing import running, watching
from uns_demo import DemoService


class Echo(Service[ServiceSettings]):
    """Publishes one data message per 'echo' command it gets; rejects 'bad' ones."""

    name = "echo"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.path = DevicePath(node.enterprise, node.site, "area", "line", "cell", "echo-01")
        self.handled = 0
        node.subscribe(self.path.topic("cmd", "echo"), Command, self.on_echo)

    async def run(self) -> None:
        await self.node.device_birth(self.path, "raw", [MetricDef(name="n", datatype="int32")])

    async def on_echo(self, msg: Inbound[Command]) -> None:
        if msg.payload.args.get("bad"):
            raise Reject("bad_command", "asked to be bad")
        self.handled += 1
        await self.node.device_data(self.path, "raw", [Metric(name="n", value=self.handled)])


def echo_cmd(**args: object) -> bytes:
    return encode(Command(ts=1, name="echo", args=dict(args)))


def cmd_topic(prefix: str) -> str:
    return f"{prefix}/pune/area/line/cell/echo-01/cmd/echo"


async def test_a_service_is_born_before_its_data_with_consecutive_sequence_numbers(
    memory_url, prefix
):
    async with watching(memory_url, f"{prefix}/#") as w, running(Echo, memory_url, prefix) as node:
        nbirth = await w.wait_topic("/_node/echo/birth")
        dbirth = await w.wait_topic("/raw/birth")
        async with connect(memory_url) as pub:
            for _ in range(3):
                await pub.publish(cmd_topic(prefix), echo_cmd())
        datas = [await w.wait_topic("/raw/data") for _ in range(3)]
    assert isinstance(nbirth, NodeBirth) and nbirth.seq == 0 and nbirth.node == node.id
    assert isinstance(dbirth, DeviceBirth) and dbirth.seq == 1 and dbirth.bdseq == nbirth.bdseq
    assert [d.seq for d in datas] == [2, 3, 4]
    assert [d.metrics[0].value for d in datas] == [1, 2, 3]
    order = [m.topic.rsplit("/", 2)[-2:] for m in w.seen if m.payload]
    assert (
        order.index(["echo", "birth"])
        < order.index(["raw", "birth"])
        < order.index(["raw", "data"])
    )


async def test_sequence_numbers_wrap_from_255_to_0(memory_url, prefix):
    async with (
        watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w,
        running(Echo, memory_url, prefix),
    ):
        async with connect(memory_url) as pub:
            for _ in range(300):
                await pub.publish(cmd_topic(prefix), echo_cmd())
        seqs = [(await w.wait_topic("/raw/data")).seq for _ in range(300)]
    assert seqs[:3] == [2, 3, 4]
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs))
    assert 0 in seqs and max(seqs) == 255


async def test_garbage_on_the_input_topic_is_dropped_and_counted_and_the_service_goes_on(
    memory_url, prefix
):
    async with (
        watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w,
        running(Echo, memory_url, prefix) as node,
    ):
        async with connect(memory_url) as pub:
            for garbage in (
                b"\x00\xffgarbage",
                b"{}",
                b'{"type":"cmd"}',
                b"[1,2]",
                encode(DeviceData(ts=1, node="x", seq=0, metrics=[])),
            ):
                await pub.publish(cmd_topic(prefix), garbage)
            await pub.publish(cmd_topic(prefix), echo_cmd())
        data = await w.wait_topic("/raw/data")
        assert data.metrics[0].value == 1
        assert node.metrics.dropped_count("decode") == 5


async def test_a_handler_can_reject_a_message_which_is_counted_under_its_reason(memory_url, prefix):
    async with (
        watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w,
        running(Echo, memory_url, prefix) as node,
    ):
        async with connect(memory_url) as pub:
            await pub.publish(cmd_topic(prefix), echo_cmd(bad=True))
            await pub.publish(cmd_topic(prefix), echo_cmd())
        await w.wait_topic("/raw/data")
        assert node.metrics.dropped_count("bad_command") == 1


async def test_a_rebirth_command_republishes_every_birth_with_the_sequence_reset(
    memory_url, prefix
):
    async with running(Echo, memory_url, prefix) as node, watching(memory_url, f"{prefix}/#") as w:
        await w.wait_topic("/raw/birth")  # retained, from the first birth
        async with connect(memory_url) as pub:
            await pub.publish(node.cmd_topic, encode(Command(ts=1, name="rebirth", sender="test")))
        nbirth = await w.wait_for(lambda m: m.topic.endswith("_node/echo/birth") and not m.retain)
        dbirth = await w.wait_for(lambda m: m.topic.endswith("raw/birth") and not m.retain)
    from uns import decode

    assert decode(nbirth.payload).seq == 0
    assert decode(dbirth.payload).seq == 1


async def test_after_a_broker_restart_the_births_come_back_and_data_flows(memory_url, prefix):
    broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
    async with running(Echo, memory_url, prefix) as node:
        assert (
            node.metrics.registry.get_sample_value("uns_reconnects_total", {"service": "echo"}) == 0
        )
        broker.stop()
        assert not broker.retained
        broker.start()
        async with watching(memory_url, f"{prefix}/#") as w:
            nbirth = await w.wait_topic("/_node/echo/birth", timeout=5)
            await w.wait_topic("/raw/birth", timeout=5)
            async with connect(memory_url) as pub:
                await pub.publish(cmd_topic(prefix), echo_cmd())
            await w.wait_topic("/raw/data")
        assert (
            node.metrics.registry.get_sample_value("uns_reconnects_total", {"service": "echo"}) >= 1
        )
    assert nbirth.bdseq == 1  # a new birth/death sequence for the new session


async def test_a_clean_stop_leaves_a_retained_death_saying_shutdown(memory_url, prefix):
    async with running(Echo, memory_url, prefix):
        pass
    async with watching(memory_url, f"{prefix}/pune/_node/+/death") as w:
        death = await w.wait_topic("/death")
    assert isinstance(death, NodeDeath) and death.reason == "shutdown"


async def test_a_new_birth_clears_the_death_of_the_previous_run(memory_url, prefix):
    async with running(Echo, memory_url, prefix):
        pass
    async with running(Echo, memory_url, prefix):
        broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
        deaths = [t for t in broker.retained if t.endswith("/death")]
        births = [t for t in broker.retained if t.endswith("/birth")]
    assert deaths == []
    assert len(births) == 2  # node and device


class Crashes(Echo):
    name = "crashes"

    async def run(self) -> None:
        await self.node.connected.wait()
        raise ZeroDivisionError("a bug")


async def test_a_bug_in_the_service_loop_crashes_it_loudly_after_publishing_its_death(
    memory_url, prefix
):
    async with watching(memory_url, f"{prefix}/pune/_node/+/death") as w:
        with pytest.raises(ExceptionGroup) as info:
            async with running(Crashes, memory_url, prefix):
                death = await w.wait_topic("/death")
    assert info.group_contains(ZeroDivisionError)
    assert death.reason == "error"


async def test_data_published_while_offline_is_kept_up_to_the_bound_then_oldest_dropped(
    memory_url, prefix
):
    broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
    path = DevicePath(prefix, "pune", "a", "l", "c", "d")
    async with running(Echo, memory_url, prefix, queue_size=5) as node:
        broker.stop()
        for i in range(8):
            await node.device_data(path, "raw", [Metric(name="i", value=i)])
        assert node.metrics.dropped_count("offline") == 3
        broker.start()
        async with watching(memory_url, f"{prefix}/pune/a/l/c/d/raw/data") as w:
            values = [(await w.wait_topic("/raw/data")).metrics[0].value for _ in range(5)]
    assert values == [3, 4, 5, 6, 7]


async def test_the_demo_service_publishes_its_device_and_obeys_set(memory_url, prefix):
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(DemoService, memory_url, prefix, interval_s=0.01),
    ):
        birth = await w.wait_topic("/raw/birth")
        assert {m.name: m.unit for m in birth.metrics}["temperature"] == "degC"
        async with connect(memory_url) as pub:
            await pub.publish(
                f"{prefix}/pune/demo/line-0/cell-0/demo-01/cmd/set",
                encode(Command(ts=1, name="set", args={"running": False})),
            )
        stopped = await w.wait_for(
            lambda m: m.topic.endswith("/raw/data") and b'"running","value":false' in m.payload
        )
    assert stopped


@pytest.mark.integration
async def test_the_runtime_reconnects_to_a_restarted_amqtt_broker(amqtt_broker, prefix):
    async with running(Echo, amqtt_broker.url, prefix) as node:
        await amqtt_broker.stop()
        await amqtt_broker.start()
        async with watching(amqtt_broker.url, f"{prefix}/#") as w:
            await w.wait_topic("/_node/echo/birth", timeout=5)
            await w.wait_topic("/raw/birth", timeout=5)
            async with connect(amqtt_broker.url) as pub:
                await pub.publish(cmd_topic(prefix), echo_cmd(), qos=1)
            assert (await w.wait_topic("/raw/data")).metrics[0].value == 1
        assert node.connected.is_set()


class Counting(Echo):
    """Reports by exception: after a (re)birth it must send its current values again."""

    name = "counting"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.rebirths = 0

    async def on_rebirth(self) -> None:
        self.rebirths += 1
        await self.node.device_data(self.path, "raw", [Metric(name="n", value=self.rebirths)])


async def test_values_follow_every_birth_so_a_new_consumer_sees_current_state(memory_url, prefix):
    async with (
        running(Counting, memory_url, prefix) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w,
    ):
        async with connect(memory_url) as pub:
            await pub.publish(node.cmd_topic, encode(Command(ts=1, name="rebirth")))
        data = await w.wait_topic("/raw/data")
    assert data.metrics[0].value == 2  # once at connect, once for the rebirth


async def test_a_death_queued_while_offline_does_not_outlive_a_newer_birth(memory_url, prefix):
    broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
    path = DevicePath(prefix, "pune", "a", "l", "c", "d")
    metrics = [MetricDef(name="n", datatype="int32")]
    async with running(Echo, memory_url, prefix) as node:
        await node.device_birth(path, "raw", metrics)
        broker.stop()
        await node.device_death(path, "raw", "plc lost")  # queued while the broker is away
        await node.device_birth(path, "raw", metrics)  # the PLC came back first
        broker.start()
        async with watching(memory_url, f"{prefix}/pune/a/l/c/d/raw/#") as w:
            await w.wait_topic("/raw/birth")
        await node.drained()
    assert f"{path}/raw/death" not in broker.retained
