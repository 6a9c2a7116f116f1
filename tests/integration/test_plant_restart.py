"""The plant service across a restart, on a real Mosquitto: it forgets no open event, neither
those it saw before it stopped (its state file) nor those raised or cleared while it was
away (its persistent session); and while it is away its health says it is stale."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from fixtures.brokers import Mosquitto
from uns import DeviceBirth, Event, decode
from uns.config import Device
from uns.payloads import Health, NodeDeath
from uns.testing import Watcher, running, watching
from uns_plant.service import PlantService

pytestmark = pytest.mark.integration

LINE = "acme/pune/stamping/line-3"
PRESS_1 = f"{LINE}/cell-a/press-01"
PRESS_2 = f"{LINE}/cell-a/press-02"
ROBOT = f"{LINE}/cell-b/robot-01"
PLANT = [
    Device(path=PRESS_1, asset="press", criticality="critical"),
    Device(path=PRESS_2, asset="press"),
    Device(path=ROBOT, asset="robot", criticality="high"),
]


def event(device: str, state: str, severity: str) -> Event:
    return Event(
        ts=2,
        id=f"e-{device.rsplit('/', 1)[1]}",
        kind="anomaly",
        state=state,  # type: ignore[arg-type]
        device=device,
        started=1,
        severity=severity,  # type: ignore[arg-type]
    )


def latest(w: Watcher, group: str) -> Health | None:
    for m in reversed(w.messages):
        if m.topic == f"{group}/_health" and m.payload:
            return decode(m.payload, Health)
    return None


async def until(w: Watcher, group: str, check: object) -> Health:
    def holds() -> bool:
        h = latest(w, group)
        return h is not None and check(h)  # type: ignore[operator]

    await w.wait(holds, why=lambda: f"last health of {group}: {latest(w, group)}")
    h = latest(w, group)
    assert h is not None
    return h


async def test_a_restart_keeps_the_open_events_and_learns_those_of_its_absence(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    url = mosquitto.url
    state = str(tmp_path / "plant-events.json")
    async with watching(url, "acme/#") as w:
        for d in PLANT:
            birth = DeviceBirth(
                ts=1, node="sim", device=d.path.rsplit("/", 1)[1], bdseq=0, seq=0, metrics=[]
            )
            await w.publish(f"{d.path}/raw/birth", birth, retain=True)
        async with running(PlantService, url, "acme", plant=PLANT, state_file=state):
            await w.publish(f"{PRESS_1}/events/anomaly", event(PRESS_1, "raised", "critical"))
            await w.publish(f"{ROBOT}/events/anomaly", event(ROBOT, "raised", "warning"))
            await until(w, LINE, lambda h: h.state == "critical" and h.open_events == 2)
        death = await w.next("acme/pune/_node/plant/death", NodeDeath)
        assert death.reason == "shutdown"
        # while it is away: press-01's event clears, press-02 raises one
        await w.publish(f"{PRESS_1}/events/anomaly", event(PRESS_1, "cleared", "critical"))
        await w.publish(f"{PRESS_2}/events/anomaly", event(PRESS_2, "raised", "warning"))
        async with running(PlantService, url, "acme", plant=PLANT, state_file=state):
            line = await until(w, LINE, lambda h: h.state == "warning" and h.open_events == 2)
            cell_a = await until(w, f"{LINE}/cell-a", lambda h: h.state == "warning")
            cell_b = await until(w, f"{LINE}/cell-b", lambda h: h.state == "warning")
    assert {c.device for c in line.causes} == {PRESS_2, ROBOT}
    assert [c.device for c in cell_a.causes] == [PRESS_2]  # raised while it was away
    assert [c.device for c in cell_b.causes] == [ROBOT]  # open before the stop, kept
    assert line.node == "plant"


async def uns(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uns",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_health_of_a_stopped_plant_service_is_shown_stale(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    url = mosquitto.url
    async with watching(url, "acme/#") as w:
        async with running(
            PlantService, url, "acme", plant=PLANT, state_file=str(tmp_path / "e.json")
        ):
            await w.publish(f"{PRESS_2}/events/anomaly", event(PRESS_2, "raised", "warning"))
            await until(w, LINE, lambda h: h.state == "warning")
            code, out, err = await uns("plant", "health", LINE, "--broker", url)
            assert code == 0, err
            assert "stale" not in out + err
        await w.next("acme/pune/_node/plant/death", NodeDeath)
        code, out, err = await uns("plant", "health", LINE, "--broker", url)
    assert code == 1
    first = out.splitlines()[0]
    assert first.split()[:3] == ["warning", "line", LINE] and first.endswith("(stale)")
    assert "stale: the plant service is offline" in err and "'plant' died (shutdown)" in err
