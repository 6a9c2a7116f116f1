"""The simulator's real OPC UA and Modbus servers, read by real clients; faults on command."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asyncua import Client, ua
from pymodbus.client import AsyncModbusTcpClient

from fixtures.ports import free_port
from uns import Command, Event, Reply, connect, decode, encode, node_topic
from uns.testing import running, watching
from uns_simulator import Simulator

pytestmark = pytest.mark.integration


class Plant:
    def __init__(self, prefix: str, node: Any, opcua: int, modbus: int) -> None:
        self.prefix = prefix
        self.node = node
        self.press = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
        self.conveyor = f"{prefix}/pune/stamping/line-3/cell-b/conveyor-01"
        self.opcua_url = f"opc.tcp://127.0.0.1:{opcua}"
        self.modbus_port = modbus


@pytest.fixture
async def plant(memory_url: str, prefix: str) -> AsyncIterator[Plant]:
    opcua, modbus = free_port(), free_port()
    devices = [
        (f"{prefix}/pune/stamping/line-3/cell-a/press-01", "press"),
        (f"{prefix}/pune/stamping/line-3/cell-b/conveyor-01", "conveyor"),
    ]
    async with running(
        Simulator,
        memory_url,
        prefix,
        plant=devices,
        tick_s=0.05,
        opcua={"port": opcua},
        modbus={"port": modbus},
    ) as node:
        await asyncio.wait_for(node.running.serving.wait(), 20)
        yield Plant(prefix, node, opcua, modbus)


def ua_node(tag: str, device: str = "cell-a.press-01") -> str:
    return f"ns=2;s=stamping.line-3.{device}.{tag}"


async def modbus_read(port: int, unit: int) -> Any:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, reconnect_delay=0)
    await c.connect()
    try:
        return await c.read_holding_registers(0, count=8, device_id=unit), c
    finally:
        c.close()


async def send(url: str, topic: str, command: Command) -> None:
    async with connect(url) as bus:
        await bus.publish(topic, encode(command), qos=1)


async def test_opcua_serves_slow_tags_with_source_timestamps(plant, memory_url):
    async with Client(plant.opcua_url, timeout=5) as c:
        temp = await c.get_node(ua_node("bearing_temp")).read_data_value()
        count = await c.get_node(ua_node("item_count", "cell-b.conveyor-01")).read_data_value()
    assert 40 < temp.Value.Value < 70 and temp.StatusCode.is_good()
    assert temp.SourceTimestamp is not None
    assert count.Value.VariantType == ua.VariantType.UInt32


async def test_vibration_arrives_as_ordered_blocks_of_10khz_samples(plant):
    got: list[Any] = []
    done = asyncio.Event()

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            got.append(data.monitored_item.Value)
            if len(got) >= 6:
                done.set()

    async with Client(plant.opcua_url, timeout=5) as c:
        sub = await c.create_subscription(50, Handler())
        await sub.subscribe_data_change(
            c.get_node(ua_node("vibration")), queuesize=100, sampling_interval=0
        )
        await asyncio.wait_for(done.wait(), 10)
    blocks = got[1:]  # the first is the current value at subscription
    assert all(len(b.Value.Value) == 1000 for b in blocks)
    starts = [b.SourceTimestamp.timestamp() for b in blocks]
    steps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
    assert steps == [0.1] * len(steps)  # 1000 samples at 10 kHz, back to back


async def test_modbus_serves_the_same_values_in_the_catalog_layout(plant):
    rr, c = await modbus_read(plant.modbus_port, 1)
    temp = c.convert_from_registers(rr.registers[0:2], c.DATATYPE.FLOAT32)
    pressure = c.convert_from_registers(rr.registers[4:6], c.DATATYPE.FLOAT32, word_order="little")
    assert 40 < temp < 70
    assert 190 < pressure < 230


async def test_an_injected_fault_is_confirmed_and_shows_in_the_data(plant, memory_url):
    async with watching(memory_url, f"{plant.prefix}/+/+/+/+/+/events/sim_fault") as w:
        await send(
            memory_url,
            f"{plant.press}/cmd/fault",
            Command(ts=1, name="fault", args={"kind": "hydraulic_leak", "severity": 1.0}),
        )
        raised = await w.wait_topic("/events/sim_fault")
    assert isinstance(raised, Event) and raised.state == "raised"
    assert raised.device == plant.press and raised.details["fault"] == "hydraulic_leak"
    async with Client(plant.opcua_url, timeout=5) as c:
        node = c.get_node(ua_node("hydraulic_pressure"))
        for _ in range(100):  # the next tick (50 ms) applies it
            if await node.read_value() < 170:
                break
            await asyncio.sleep(0.05)
        assert await node.read_value() < 170


async def test_a_dropout_gives_bad_status_on_opcua_and_an_exception_on_modbus(plant, memory_url):
    async with watching(memory_url, f"{plant.prefix}/+/+/+/+/+/events/sim_fault") as w:
        await send(
            memory_url,
            f"{plant.conveyor}/cmd/fault",
            Command(ts=1, name="fault", args={"kind": "dropout"}),
        )
        await w.wait_topic("/events/sim_fault")
        rr, _ = await modbus_read(plant.modbus_port, 2)
        assert rr.isError() and rr.exception_code == 0x0B
        ok, _ = await modbus_read(plant.modbus_port, 1)
        assert not ok.isError(), "the other machine still answers"
        async with Client(plant.opcua_url, timeout=5) as c:
            node = c.get_node(ua_node("bearing_temp", "cell-b.conveyor-01"))
            for _ in range(100):
                dv = await node.read_data_value(raise_on_bad_status=False)
                if dv.StatusCode.name == "BadCommunicationError":
                    break
                await asyncio.sleep(0.05)
            assert dv.StatusCode.name == "BadCommunicationError"
        await send(memory_url, f"{plant.conveyor}/cmd/clear", Command(ts=1, name="clear"))
        cleared = await w.wait_for(lambda m: b'"cleared"' in m.payload)
        assert decode(cleared.payload).details["fault"] == "dropout"
    rr, _ = await modbus_read(plant.modbus_port, 2)
    assert not rr.isError()


async def test_status_lists_machines_and_active_faults(plant, memory_url):
    await send(
        memory_url,
        f"{plant.press}/cmd/fault",
        Command(ts=1, name="fault", args={"kind": "bearing_wear", "severity": 0.5, "ramp_s": 3600}),
    )
    topic = node_topic(plant.prefix, "pune", "simulator", "cmd")
    async with watching(memory_url, "uns-cli/simulator/test/reply") as w:
        for _ in range(50):  # until the fault command has been handled
            await send(
                memory_url,
                topic,
                Command(
                    ts=1, name="status", id="s1", args={"reply_to": "uns-cli/simulator/test/reply"}
                ),
            )
            reply = await w.wait_topic("uns-cli/simulator/test/reply")
            if reply.result["devices"][plant.press]["faults"]:
                break
    assert isinstance(reply, Reply) and reply.ok and reply.id == "s1"
    press = reply.result["devices"][plant.press]
    assert press["asset"] == "press" and press["unit_id"] == 1
    assert press["faults"]["bearing_wear"]["severity"] == 0.5


async def test_a_bad_fault_command_is_refused_and_counted(plant, memory_url):
    await send(
        memory_url,
        f"{plant.press}/cmd/fault",
        Command(ts=1, name="fault", args={"kind": "gremlins"}),
    )
    for _ in range(100):
        if plant.node.metrics.dropped_count("bad_command"):
            break
        await asyncio.sleep(0.02)
    assert plant.node.metrics.dropped_count("bad_command") == 1


async def test_a_generated_40_machine_plant_is_valid_and_served(memory_url, prefix, tmp_path):
    from clitools import uns
    from uns import load
    from uns_modbus_adapter import ModbusAdapterSettings
    from uns_opcua_adapter import OpcUaAdapterSettings
    from uns_simulator import scaled_plant

    config = tmp_path / "plant40.yaml"
    r = await asyncio.to_thread(uns, "sim", "plant", "--machines", "40", "--out", str(config))
    assert r.returncode == 0, r.stderr
    loaded = load(config, environ={})
    assert len(loaded.config.plant.devices) == 40
    ua = loaded.service("opcua-adapter", OpcUaAdapterSettings)
    mb = loaded.service("modbus-adapter", ModbusAdapterSettings)
    assert len(ua.devices) + len(mb.devices) == 40
    assert len({d.unit_id for d in mb.devices}) == len(mb.devices)

    devices = [(str(p), a) for p, a in scaled_plant(40, enterprise=prefix)]
    opcua = free_port()
    async with running(
        Simulator,
        memory_url,
        prefix,
        plant=devices,
        opcua={"port": opcua},
        modbus={"port": free_port()},
    ) as node:
        await asyncio.wait_for(node.running.serving.wait(), 30)
        async with Client(f"opc.tcp://127.0.0.1:{opcua}", timeout=5) as c:
            last = c.get_node("ns=2;s=stamping.line-7.cell-a.press-04.vibration")
            assert len(await last.read_value()) == 1000
