"""Issue 13's Done-when for health, end to end and in-process: the example plant's devices
and relations, two of its presses simulated on real OPC UA, read by the adapter, featurized,
scored by the shipped signed press model, and the plant service's health of their cell and
line, which follows the anomaly event within one scoring cycle, both ways."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fixtures.ports import free_port
from uns import Command, DevicePath, Event, connect, decode, encode
from uns.bus import Message
from uns.config import EXAMPLE_CONFIG, Device, load
from uns.payloads import Health
from uns.testing import running, watching
from uns_featurizer import Featurizer
from uns_inference import Inference
from uns_opcua_adapter import OpcUaAdapter
from uns_plant.service import PlantService
from uns_simulator import Simulator, adapter_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def example_plant(prefix: str) -> list[Device]:
    """The example plant's devices, relations and criticality, under ``prefix``."""

    def moved(path: str) -> str:
        return prefix + path.removeprefix("acme")

    return [
        msgspec.structs.replace(d, path=moved(d.path), feeds=[moved(f) for f in d.feeds])
        for d in load(EXAMPLE_CONFIG, environ={}).config.plant.devices
    ]


def health_of(m: Message, topic: str) -> Health | None:
    return decode(m.payload, Health) if m.topic == topic and m.payload else None


def scoring_cycles(messages: list[Message], device: str, start: int, end: int) -> int:
    """How many scores of ``device`` the broker delivered between two messages."""
    return sum(m.topic == f"{device}/scores/data" for m in messages[start + 1 : end])


async def test_bearing_wear_turns_its_cell_and_line_warning_within_a_scoring_cycle(
    memory_url: str, prefix: str, tmp_path: Path
) -> None:
    plant = example_plant(prefix)
    presses = [d for d in plant if d.asset == "press"][:2]  # two simulated: enough, and light
    press, other = presses[0].path, presses[1].path
    cell, line = press.rsplit("/", 2)[0], press.rsplit("/", 3)[0]
    opcua_port = free_port()
    sections = adapter_config(
        [(DevicePath.parse(d.path), d.asset) for d in presses],
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=free_port(),
        rate_hz=10_000.0,
    )
    assert next(d for d in plant if d.path == press).criticality == "medium"
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            Simulator,
            memory_url,
            prefix,
            plant=[(d.path, d.asset) for d in presses],
            tick_s=0.05,
            opcua={"port": opcua_port},
            modbus={"enabled": False},
        ) as sim,
    ):
        await asyncio.wait_for(sim.running.serving.wait(), 20)
        async with (
            running(OpcUaAdapter, memory_url, prefix, **sections["opcua-adapter"]),
            running(Featurizer, memory_url, prefix, plant=[(d.path, d.asset) for d in presses]),
            running(
                Inference,
                memory_url,
                prefix,
                plant=[(d.path, d.asset) for d in presses],
                models_dir=str(ROOT / "models"),
                pubkey=str(ROOT / "keys/models.pub"),
                audit_log=str(tmp_path / "audit.jsonl"),
            ),
            running(
                PlantService,
                memory_url,
                prefix,
                plant=plant,
                state_file=str(tmp_path / "plant-events.json"),
            ),
        ):
            # healthy first: both presses scored, their line ok
            await w.wait_for(lambda m: m.topic == f"{other}/scores/data", 60)
            await w.wait(lambda: latest(w.messages, f"{line}/_health", "ok") is not None)
            async with connect(memory_url) as bus:
                await bus.publish(
                    f"{press}/cmd/fault",
                    encode(
                        Command(ts=1, name="fault", args={"kind": "bearing_wear", "ramp_s": 60})
                    ),
                    qos=1,
                )
            raised = await w.wait_for(lambda m: is_event(m, press, "raised"), 150)
            r = w.messages.index(raised)
            await w.wait(lambda: opened(w.messages, r, f"{line}/_health") is not None, 30)
            await w.wait(lambda: opened(w.messages, r, f"{cell}/_health") is not None, 30)
            line_at, line_h = opened(w.messages, r, f"{line}/_health")  # type: ignore[misc]
            cell_at, cell_h = opened(w.messages, r, f"{cell}/_health")  # type: ignore[misc]
            async with connect(memory_url) as bus:
                await bus.publish(f"{press}/cmd/clear", encode(Command(ts=1, name="clear")), qos=1)
            cleared = await w.wait_for(lambda m: is_event(m, press, "cleared"), 150)
            c = w.messages.index(cleared)
            await w.wait(lambda: back(w.messages, c, f"{line}/_health") is not None, 30)
            await w.wait(lambda: back(w.messages, c, f"{cell}/_health") is not None, 30)
            line_ok = back(w.messages, c, f"{line}/_health")
            cell_ok = back(w.messages, c, f"{cell}/_health")
    messages = w.messages
    event = decode(raised.payload, Event)
    # the documented state: an open event on a medium press makes its cell and line warning
    for h in (line_h, cell_h):
        assert h.state == "warning" and h.open_events == 1, h
        reasons = {c.device: c.reason for c in h.causes}
        assert f"{event.severity} anomaly event open on a medium asset" in reasons[press], h
        assert other not in reasons
    assert scoring_cycles(messages, press, r, line_at) <= 1
    assert scoring_cycles(messages, press, r, cell_at) <= 1
    assert line_ok is not None and cell_ok is not None
    assert scoring_cycles(messages, press, c, line_ok) <= 1
    assert scoring_cycles(messages, press, c, cell_ok) <= 1
    other_cell = next(d.path for d in plant if d.asset == "conveyor").rsplit("/", 1)[0]
    untouched = [health_of(m, f"{other_cell}/_health") for m in messages]
    assert {h.state for h in untouched if h is not None} == {"ok"}


def is_event(m: Message, device: str, state: str) -> bool:
    if m.topic != f"{device}/events/anomaly" or not m.payload:
        return False
    return decode(m.payload, Event).state == state


def latest(messages: list[Message], topic: str, state: str) -> Health | None:
    for m in reversed(messages):
        if (h := health_of(m, topic)) is not None:
            return h if h.state == state else None
    return None


def opened(messages: list[Message], after: int, topic: str) -> tuple[int, Health] | None:
    """The first health on ``topic`` after message ``after`` that counts an open event."""
    for i in range(after + 1, len(messages)):
        if (h := health_of(messages[i], topic)) is not None and h.open_events:
            return i, h
    return None


def back(messages: list[Message], after: int, topic: str) -> Any:
    """The index of the first ok health on ``topic`` after message ``after``."""
    for i in range(after + 1, len(messages)):
        if (h := health_of(messages[i], topic)) is not None and h.state == "ok":
            return i
    return None
