"""`uns top --once` shows the plant service's health roll-up and OEE: one row per area, line
and cell above the devices, marked stale once the plant service's node is dead."""

from __future__ import annotations

import asyncio

import pytest

from clitools import uns
from uns import NodeBirth, connect, encode, now_ms
from uns.payloads import Health, HealthCause, NodeDeath, Oee

pytestmark = pytest.mark.integration

LINE = "acme/pune/stamping/line-3"
PRESS = f"{LINE}/cell-a/press-01"


def oee(path: str, level: str, window: str, **flags: list[str]) -> Oee:
    return Oee(
        ts=now_ms(), level=level, path=path, window=window,
        shift="early" if window == "shift" else "",
        start=1, end=2, availability=0.9, performance=0.8, quality=0.95, oee=0.684,
        planned_s=3600, run_s=3240, ideal_count=1620, count=1296, good=1231, scrap=65,
        devices=2, flags=flags, node="plant",
    )  # fmt: skip


async def frame(url: str, *, dead: bool) -> list[str]:
    async with connect(url) as bus:
        birth = NodeBirth(ts=now_ms(), node="plant", service="plant", bdseq=0)
        await bus.publish("acme/pune/_node/plant/birth", encode(birth), retain=True)
        if dead:
            death = NodeDeath(ts=now_ms(), node="plant", bdseq=0, reason="lost")
            await bus.publish("acme/pune/_node/plant/death", encode(death), retain=True)
        cause = HealthCause(
            device=PRESS, state="warning", reason="warning anomaly event open on a medium asset"
        )
        for path, level, state in (
            ("acme/pune/stamping", "area", "warning"),
            (LINE, "line", "warning"),
            (f"{LINE}/cell-a", "cell", "warning"),
            (f"{LINE}/cell-b", "cell", "ok"),
        ):
            health = Health(
                ts=now_ms(), level=level, path=path, state=state, devices=2,  # type: ignore[arg-type]
                causes=[cause] if state != "ok" else [], node="plant",
            )  # fmt: skip
            await bus.publish(f"{path}/_health", encode(health), retain=True, qos=1)
        for window in ("shift", "hour"):
            await bus.publish(
                f"{LINE}/_oee/{window}", encode(oee(LINE, "line", window)), retain=True, qos=1
            )
        cell_b = oee(f"{LINE}/cell-b", "cell", "shift", quality_assumed=[f"{LINE}/cell-b/robot-01"])
        await bus.publish(f"{LINE}/cell-b/_oee/shift", encode(cell_b), retain=True, qos=1)
    r = await asyncio.to_thread(uns, "top", "--once", "--wait", "1", "--broker", url)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def row(lines: list[str], name: str) -> list[str]:
    return next(x.split() for x in lines if x.split()[:1] == [name])


async def test_once_shows_each_groups_health_why_and_oee(amqtt_broker):
    lines = await frame(amqtt_broker.url, dead=False)
    assert row(lines, "stamping")[1] == "warning"
    line = row(lines, "stamping/line-3")
    assert line[1:3] == ["warning", "press-01:"] and line[-5:] == [
        "68.4%", "90.0%", "80.0%", "95.0%", "68.4%",
    ]  # fmt: skip
    assert row(lines, "stamping/line-3/cell-b")[1:2] == ["ok"]
    assert row(lines, "stamping/line-3/cell-b")[-2:] == ["95.0%*", "-"]  # assumed; no hour yet
    assert lines.index(next(x for x in lines if x.startswith("line / cell"))) < lines.index(
        next(x for x in lines if x.lstrip().startswith("device"))
    )  # above the devices


async def test_once_marks_a_dead_plant_services_health_stale(amqtt_broker):
    lines = await frame(amqtt_broker.url, dead=True)
    assert row(lines, "stamping/line-3")[1:3] == ["warning", "(stale)"]
