"""`uns plant health` as a user runs it: a process reading the plant service's retained
health from a real broker (amqtt)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from uns import Event
from uns.config import Device
from uns.testing import running, watching
from uns_plant.service import PlantService

LINE = "acme/pune/stamping/line-3"
PRESS = f"{LINE}/cell-a/press-01"
ROBOT = f"{LINE}/cell-b/robot-01"


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


async def test_health_prints_the_line_its_cells_and_the_cause(amqtt_broker, tmp_path: Path):
    config = tmp_path / "plant.yaml"
    config.write_text(
        "plant:\n  devices:\n"
        f"    - {{path: {PRESS}, asset: press, feeds: [{ROBOT}], criticality: critical}}\n"
        f"    - {{path: {ROBOT}, asset: robot}}\n",
        encoding="utf-8",
    )
    url = amqtt_broker.url
    plant = [
        Device(path=PRESS, asset="press", feeds=[ROBOT], criticality="critical"),
        Device(path=ROBOT, asset="robot"),
    ]
    raised = Event(
        ts=1, id="e1", kind="anomaly", state="raised", device=PRESS, started=1, severity="critical"
    )
    async with (
        watching(url, f"{LINE}/+/_health") as w,
        running(PlantService, url, "acme", plant=plant, state_file=str(tmp_path / "e.json")),
    ):
        await w.publish(f"{PRESS}/events/anomaly", raised)
        await w.wait(lambda: any(m.payload and b'"critical"' in m.payload for m in w.messages))
        code, out, err = await uns(
            "plant", "health", LINE, "--broker", url, "--config", str(config)
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["critical", "line", LINE]
    assert any(line.split()[:3] == ["critical", "cell", f"{LINE}/cell-a"] for line in lines)
    assert any(line.split()[:3] == ["ok", "cell", f"{LINE}/cell-b"] for line in lines)
    assert any(f"{PRESS}: critical anomaly event open on a critical asset" in x for x in lines)


async def test_health_without_the_service_says_so_and_exits_1(amqtt_broker):
    code, _, err = await uns(
        "plant", "health", "acme/pune", "--broker", amqtt_broker.url, "--timeout", "0.5"
    )
    assert code == 1 and "is `uns run plant` running?" in err


async def test_oee_prints_each_cell_and_line_with_its_inputs(amqtt_broker, tmp_path: Path):
    from datetime import UTC, datetime, timedelta

    from uns import DeviceBirth, DeviceData, Metric, MetricDef, decode, now_ms
    from uns.payloads import Oee

    url = amqtt_broker.url
    plant = [Device(path=PRESS, asset="press"), Device(path=ROBOT, asset="robot")]
    start = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%H:%M")
    async with (
        watching(url, f"{LINE}/#") as w,
        running(
            PlantService,
            url,
            "acme",
            plant=plant,
            state_file=str(tmp_path / "e.json"),
            oee={"shifts": [{"name": "early", "start": start, "hours": 1}], "publish_s": 0.2},
        ),
    ):
        defs = [
            MetricDef(name="stroke_count", datatype="uint32"),
            MetricDef(name="run_state", datatype="bool"),
        ]
        birth = DeviceBirth(
            ts=now_ms(), node="sim", device="press-01", bdseq=0, seq=0, metrics=defs
        )
        await w.publish(f"{PRESS}/raw/birth", birth, retain=True)
        t = now_ms()
        for i, count in enumerate((100, 110, 120)):
            metrics = [
                Metric(name="stroke_count", value=count),
                Metric(name="run_state", value=True),
            ]
            await w.publish(
                f"{PRESS}/raw/data", DeviceData(ts=t + i, node="sim", seq=i + 1, metrics=metrics)
            )
        await w.wait(
            lambda: any(
                m.topic == f"{LINE}/_oee/shift" and m.payload and decode(m.payload, Oee).count == 20
                for m in w.messages
            )
        )
        code, out, err = await uns("plant", "oee", LINE, "--broker", url, "--config", "/dev/null")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{LINE}  shift early: OEE ")
    assert "20 made of" in lines[1] and "0 scrap; quality_assumed: " + PRESS in lines[1]
    assert any(x.startswith(f"  {LINE}/cell-a  shift early") for x in lines)
