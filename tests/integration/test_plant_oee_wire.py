"""OEE on the wire: the simulator's presses (OPC UA) and robot (Modbus TCP) with scrap,
read by the adapters, and the plant service's retained OEE of their cells and line."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fixtures.ports import free_port
from uns import DevicePath, decode
from uns.bus import Message
from uns.payloads import Oee
from uns.testing import running, watching
from uns_modbus_adapter import ModbusAdapter
from uns_opcua_adapter import OpcUaAdapter
from uns_plant.service import PlantService
from uns_simulator import Simulator, adapter_config

pytestmark = pytest.mark.integration


def oee(m: Message, topic: str) -> Oee | None:
    return decode(m.payload, Oee) if m.topic == topic and m.payload else None


async def test_the_cells_and_line_oee_show_the_simulated_scrap_with_their_inputs(
    memory_url: str, prefix: str, tmp_path: Path
) -> None:
    line = f"{prefix}/pune/stamping/line-3"
    devices = [
        (f"{line}/cell-a/press-01", "press"),
        (f"{line}/cell-a/press-02", "press"),
        (f"{line}/cell-b/robot-01", "robot"),
    ]
    opcua_port, modbus_port = free_port(), free_port()
    sections = adapter_config(
        [(DevicePath.parse(p), a) for p, a in devices],
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=modbus_port,
        rate_hz=10_000.0,
    )
    started = datetime.now(UTC) - timedelta(minutes=1)  # a shift that is on now
    shift = {"name": "early", "start": started.strftime("%H:%M"), "hours": 2}
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(watching(memory_url, f"{prefix}/+/+/+/#"))
        sim = await stack.enter_async_context(
            running(
                Simulator,
                memory_url,
                prefix,
                plant=devices,
                tick_s=0.05,
                opcua={"port": opcua_port},
                modbus={"port": modbus_port},
                production={"scrap_rate": 0.5},
            )
        )
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        for cls, section in ((OpcUaAdapter, "opcua-adapter"), (ModbusAdapter, "modbus-adapter")):
            await stack.enter_async_context(running(cls, memory_url, prefix, **sections[section]))
        plant = await stack.enter_async_context(
            running(
                PlantService,
                memory_url,
                prefix,
                plant=devices,
                state_file=str(tmp_path / "plant-events.json"),
                oee={"shifts": [shift], "publish_s": 0.5},
            )
        )

        def made(topic: str, enough: int) -> bool:
            return any(
                (o := oee(m, topic)) is not None and o.count >= enough and o.scrap >= 2
                for m in w.messages
            )

        await w.wait(lambda: made(f"{line}/cell-a/_oee/shift", 6), 60)
        await w.wait(lambda: any(oee(m, f"{line}/cell-b/_oee/hour") for m in w.messages), 60)
        await w.wait(lambda: any(oee(m, f"{line}/_oee/shift") for m in w.messages), 60)
        registry = plant.metrics.registry
        gauge = registry.get_sample_value(
            "uns_plant_oee",
            {"service": "plant", "path": f"{line}/cell-a", "window": "shift", "factor": "quality"},
        )
        health = registry.get_sample_value(
            "uns_plant_health", {"service": "plant", "path": line, "level": "line"}
        )
    presses = next(
        o
        for m in reversed(w.messages)
        if (o := oee(m, f"{line}/cell-a/_oee/shift")) is not None and o.scrap >= 2
    )
    robot = next(
        o for m in reversed(w.messages) if (o := oee(m, f"{line}/cell-b/_oee/hour")) is not None
    )
    whole = next(o for m in reversed(w.messages) if (o := oee(m, f"{line}/_oee/shift")))
    assert presses.level == "cell" and presses.shift == "early" and presses.devices == 2
    assert presses.good + presses.scrap == presses.count and presses.quality < 1.0
    assert "quality_assumed" not in presses.flags  # the presses count their scrap
    # a reader can check the arithmetic from the inputs
    assert presses.availability == pytest.approx(presses.run_s / presses.planned_s, rel=1e-3)
    assert presses.performance == pytest.approx(presses.count / presses.ideal_count, rel=1e-3)
    assert presses.quality == pytest.approx(presses.good / presses.count, rel=1e-3)
    assert presses.oee == pytest.approx(
        presses.availability * presses.performance * presses.quality, rel=1e-3
    )
    assert presses.availability > 0.9 and presses.run_s <= presses.planned_s
    assert robot.quality == 1.0 and robot.flags["quality_assumed"] == [f"{line}/cell-b/robot-01"]
    assert whole.level == "line" and whole.devices == 3 and whole.node == "plant"
    assert gauge is not None and 0 < gauge < 1  # what Grafana shows
    assert health == 0  # ok: the simulated faults are scrap, not anomalies
