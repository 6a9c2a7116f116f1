"""The plant on the wire, end to end: the simulator's real servers read by both adapters."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from clitools import Proc, start
from fixtures.ports import free_port
from uns import Command, DeviceBirth, DeviceData, DeviceDeath, DevicePath, Waveform, connect, encode
from uns.testing import Watcher, running, watching
from uns_modbus_adapter import ModbusAdapter
from uns_opcua_adapter import OpcUaAdapter
from uns_simulator import ASSETS, Simulator, adapter_config

pytestmark = pytest.mark.integration


class Line:
    """Two presses over OPC UA and a robot over Modbus, on a simulator at free ports."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        base = f"{prefix}/pune/stamping/line-3"
        self.devices = [
            (f"{base}/cell-a/press-01", "press"),
            (f"{base}/cell-a/press-02", "press"),
            (f"{base}/cell-b/robot-01", "robot"),
        ]
        self.press, self.press2, self.robot = (d for d, _ in self.devices)
        self.opcua_port, self.modbus_port = free_port(), free_port()
        self.sections = adapter_config(
            [(DevicePath.parse(p), a) for p, a in self.devices],
            opcua_url=f"opc.tcp://127.0.0.1:{self.opcua_port}",
            modbus_host="127.0.0.1",
            modbus_port=self.modbus_port,
            rate_hz=10_000.0,
        )

    def simulator(self, url: str) -> Any:
        return running(
            Simulator,
            url,
            self.prefix,
            plant=self.devices,
            tick_s=0.05,
            opcua={"port": self.opcua_port},
            modbus={"port": self.modbus_port},
        )


@pytest.fixture
async def line(memory_url: str, prefix: str) -> AsyncIterator[tuple[Line, Watcher, AsyncExitStack]]:
    plant = Line(prefix)
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(watching(memory_url, f"{prefix}/#"))
        sim = await stack.enter_async_context(plant.simulator(memory_url))
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        await stack.enter_async_context(
            running(OpcUaAdapter, memory_url, prefix, **plant.sections["opcua-adapter"])
        )
        await stack.enter_async_context(
            running(
                ModbusAdapter,
                memory_url,
                prefix,
                reconnect_max_s=0.5,
                **plant.sections["modbus-adapter"],
            )
        )
        yield plant, w, stack


def payload(m: Any) -> Any:
    from uns import decode

    return decode(m.payload)


async def collect(w: Watcher, until: Any, timeout: float = 20) -> None:
    await w.wait_for(lambda m: until(), timeout)


async def test_every_tag_arrives_on_its_topic_with_unit_and_good_quality(line):
    plant, w, _ = line
    births: dict[str, DeviceBirth] = {}
    values: dict[str, dict[str, Any]] = {d: {} for d, _ in plant.devices}

    def seen(m: Any) -> bool:
        if m.payload and m.topic.endswith("/raw/birth"):
            births[m.topic.rsplit("/", 2)[0]] = payload(m)
        elif m.topic.endswith("/raw/data"):
            data: DeviceData = payload(m)
            for metric in data.metrics:
                values[m.topic.rsplit("/", 2)[0]][metric.name] = metric
        return len(births) == 3 and all(
            len(values[d]) == len(ASSETS[a]) + (a != "robot") for d, a in plant.devices
        )

    await w.wait_for(seen, 30)
    for device, asset in plant.devices:
        units = {m.name: m.unit for m in births[device].metrics}
        for tag in ASSETS[asset]:
            assert units[tag.name] == tag.unit, (device, tag.name)
            assert values[device][tag.name].quality == "good"
    assert births[plant.press].node == "opcua-adapter"
    assert births[plant.robot].node == "modbus-adapter"
    assert 40 < values[plant.press]["bearing_temp"].value < 70
    assert 5 < values[plant.robot]["air_pressure"].value < 7


async def test_waveform_blocks_arrive_complete_and_in_order(line):
    plant, w, _ = line
    blocks: list[Waveform] = []

    def seen(m: Any) -> bool:
        if m.topic == f"{plant.press}/raw/data":
            blocks.extend(x.value for x in payload(m).metrics if isinstance(x.value, Waveform))
        return len(blocks) >= 20

    await w.wait_for(seen, 30)
    assert all(len(b) == 1000 and b.rate_hz == 10_000 for b in blocks)
    starts = [b.t0_us for b in blocks]
    assert all(b - a == 100_000 for a, b in itertools.pairwise(starts))  # no gap, no reorder


async def test_an_injected_fault_is_visible_in_the_data(line, memory_url):
    plant, w, _ = line
    async with connect(memory_url) as bus:
        await bus.publish(
            f"{plant.press2}/cmd/fault",
            encode(Command(ts=1, name="fault", args={"kind": "hydraulic_leak", "severity": 1.0})),
            qos=1,
        )

    def leaking(m: Any) -> bool:
        if m.topic != f"{plant.press2}/raw/data":
            return False
        p = {x.name: x.value for x in payload(m).metrics}.get("hydraulic_pressure")
        return p is not None and p < 170

    await w.wait_for(leaking, 20)


async def test_a_dropout_gives_bad_quality_then_a_device_death_on_modbus(line, memory_url):
    plant, w, _ = line
    await w.wait_for(lambda m: m.topic == f"{plant.robot}/raw/data", 20)
    async with connect(memory_url) as bus:
        await bus.publish(
            f"{plant.robot}/cmd/fault",
            encode(Command(ts=1, name="fault", args={"kind": "dropout"})),
            qos=1,
        )
    bad = await w.wait_for(
        lambda m: (
            m.topic == f"{plant.robot}/raw/data"
            and any(x.quality == "bad" for x in payload(m).metrics)
        ),
        20,
    )
    assert "ModbusException:11" in {x.reason for x in payload(bad).metrics}
    death = await w.wait_for(lambda m: m.topic == f"{plant.robot}/raw/death" and m.payload, 20)
    assert isinstance(payload(death), DeviceDeath)


async def test_a_server_restart_gives_death_then_birth_then_data(memory_url, prefix):
    plant = Line(prefix)
    async with watching(memory_url, f"{prefix}/#") as w, AsyncExitStack() as stack:
        sim_cm = plant.simulator(memory_url)
        sim = await sim_cm.__aenter__()
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        await stack.enter_async_context(
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                reconnect_max_s=0.5,
                **plant.sections["opcua-adapter"],
            )
        )
        await stack.enter_async_context(
            running(
                ModbusAdapter,
                memory_url,
                prefix,
                reconnect_max_s=0.5,
                **plant.sections["modbus-adapter"],
            )
        )
        devices = (plant.press, plant.robot)
        await w.wait_for(sequence(devices, ["data"]), 20)
        await sim_cm.__aexit__(None, None, None)  # both servers go away
        await w.wait_for(sequence(devices, ["death"]), 20)
        async with plant.simulator(memory_url) as sim2:
            await asyncio.wait_for(sim2.running.serving.wait(), 20)
            await w.wait_for(sequence(devices, ["birth", "data"]), 30)


def sequence(devices: tuple[str, ...], steps: list[str]) -> Any:
    """A predicate that holds once every device has shown ``steps`` in that order."""
    progress = dict.fromkeys(devices, 0)

    def seen(m: Any) -> bool:
        device, _, message = m.topic.rpartition("/raw/")
        step = progress.get(device, len(steps))
        if m.payload and step < len(steps) and message == steps[step]:
            progress[device] = step + 1
        return all(n == len(steps) for n in progress.values())

    return seen


def test_uns_up_runs_the_plant_and_every_device_is_born_and_sends_data(procs):
    from fixtures.ports import free_port as fp
    from uns import load

    port, opcua, modbus = fp(), fp(), fp()
    up = start(
        procs,
        "up",
        "--port",
        str(port),
        "--opcua-port",
        str(opcua),
        "--modbus-port",
        str(modbus),
        "--metrics-port",
        "0",
        ready="namespace on",
    )
    devices = {d.path for d in load(environ={}).config.plant.devices}
    sub = Proc("sub", "acme/#", "--json", "--timeout", "45", "--broker", f"mqtt://127.0.0.1:{port}")
    procs.append(sub)
    born: set[str] = set()
    data: set[str] = set()
    assert sub.p.stdout is not None
    for line_text in sub.p.stdout:
        msg = json.loads(line_text)
        device = msg["topic"].rsplit("/", 2)[0]
        if msg["topic"].endswith("/raw/birth") and msg["payload"]:
            born.add(device)
        elif msg["topic"].endswith("/raw/data"):
            data.add(device)
        if born >= devices and data >= devices:
            break
    assert born >= devices and data >= devices, (devices - born, devices - data)
    assert up.stop(signal.SIGTERM) == 0


async def test_opcua_browse_writes_a_starter_tag_map_from_the_live_server(
    memory_url, prefix, tmp_path
):
    import yaml

    from clitools import uns

    plant = Line(prefix)
    async with plant.simulator(memory_url) as sim:
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        out = tmp_path / "opcua.yaml"
        r = await asyncio.to_thread(
            uns, "opcua", "browse", f"opc.tcp://127.0.0.1:{plant.opcua_port}", "--out", str(out)
        )
    assert r.returncode == 0, r.stderr
    section = yaml.safe_load(out.read_text())["services"]["opcua-adapter"]
    nodes = {t["node"] for d in section["devices"] for t in d["tags"]}
    # by namespace URI, which survives a rebuilt PLC project (an index may not)
    assert "nsu=urn:uns:simulator;s=stamping.line-3.cell-a.press-01.bearing_temp" in nodes
    assert "nsu=urn:uns:simulator;s=stamping.line-3.cell-b.robot-01.vibration" in nodes


async def test_after_a_rebirth_request_every_device_sends_its_current_values(line, memory_url):
    plant, w, _ = line
    await w.wait_for(sequence((plant.press, plant.robot), ["birth", "data"]), 30)
    for node_id in ("opcua-adapter", "modbus-adapter"):
        async with connect(memory_url) as bus:
            await bus.publish(
                f"{plant.prefix}/pune/_node/{node_id}/cmd",
                encode(Command(ts=1, name="rebirth")),
                qos=1,
            )
    full = {plant.press: len(ASSETS["press"]), plant.robot: len(ASSETS["robot"])}

    def complete_after_rebirth(m: Any) -> bool:
        device, _, message = m.topic.rpartition("/raw/")
        if message == "birth" and m.payload and device in full and not m.retain:
            reborn.add(device)
        if message == "data" and device in reborn:  # all values, within one poll cycle
            names[device] |= {
                x.name for x in payload(m).metrics if not isinstance(x.value, Waveform)
            }
        return all(len(names[d]) >= n for d, n in full.items())

    reborn: set[str] = set()
    names: dict[str, set[str]] = {d: set() for d in full}
    await w.wait_for(complete_after_rebirth, 20)


async def test_features_of_the_simulated_line_show_bearing_wear(memory_url, prefix):
    from uns_featurizer import Featurizer

    plant = Line(prefix)
    async with (
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        plant.simulator(memory_url) as sim,
    ):
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        async with (
            running(OpcUaAdapter, memory_url, prefix, **plant.sections["opcua-adapter"]),
            running(Featurizer, memory_url, prefix, plant=plant.devices),
        ):
            from uns import now_ms

            injected = now_ms()
            async with connect(memory_url) as bus:
                await bus.publish(
                    f"{plant.press2}/cmd/fault",
                    encode(
                        Command(ts=1, name="fault", args={"kind": "bearing_wear", "severity": 0.8})
                    ),
                    qos=1,
                )
            env: dict[str, float] = {}

            def both(m: Any) -> bool:
                device = m.topic.rsplit("/", 2)[0]
                data = payload(m)
                feats = {x.name: x.value for x in data.metrics}
                after = data.window.start > injected + 500  # the simulator's next tick applied it
                if "vibration.env_bpfo" in feats and data.window.good == 10_000 and after:
                    env[device] = feats["vibration.env_bpfo"]
                return plant.press in env and plant.press2 in env

            await w.wait_for(both, 30)
    assert env[plant.press2] > 10 * env[plant.press]


async def test_bearing_wear_raises_one_anomaly_event_and_clearing_it_clears_it(
    memory_url, prefix, tmp_path
):
    """The Done-when of the pipeline, in-process: the shipped, signed press model."""
    from pathlib import Path

    from uns import Event, now_ms
    from uns_featurizer import Featurizer
    from uns_inference import Inference

    root = Path(__file__).parents[2]
    plant = Line(prefix)
    async with (
        watching(memory_url, f"{prefix}/+/+/+/+/+/events/anomaly") as w,
        plant.simulator(memory_url) as sim,
    ):
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        async with (
            running(OpcUaAdapter, memory_url, prefix, **plant.sections["opcua-adapter"]),
            running(Featurizer, memory_url, prefix, plant=plant.devices),
            running(
                Inference,
                memory_url,
                prefix,
                plant=plant.devices,
                models_dir=str(root / "models"),
                pubkey=str(root / "keys/models.pub"),
                audit_log=str(tmp_path / "audit.jsonl"),
            ),
        ):
            started = now_ms()
            async with connect(memory_url) as bus:
                await bus.publish(
                    f"{plant.press}/cmd/fault",
                    encode(
                        Command(ts=1, name="fault", args={"kind": "bearing_wear", "ramp_s": 60})
                    ),
                    qos=1,
                )
            raised = payload(await w.wait_for(lambda m: b'"raised"' in m.payload, 120))
            assert isinstance(raised, Event) and raised.device == plant.press
            assert raised.details["model"] == "press-anomaly"
            lead_s = (raised.ts - started) / 1000
            async with connect(memory_url) as bus:
                await bus.publish(
                    f"{plant.press}/cmd/clear", encode(Command(ts=1, name="clear")), qos=1
                )
            cleared = payload(await w.wait_for(lambda m: b'"cleared"' in m.payload, 120))
    assert cleared.id == raised.id and cleared.count >= 1
    others = [m for m in w.seen if payload(m).device != plant.press]
    assert others == [], "the healthy presses raised nothing"
    assert lead_s < 120
