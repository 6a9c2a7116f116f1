"""The plant service: a device's faults change its cell's and line's retained health, and
clearing them restores it; the asset graph answers upstream and downstream."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from uns import DeviceBirth, DeviceDeath, Event, decode
from uns.config import EXAMPLE_CONFIG, Device, load
from uns.payloads import Health, HealthState
from uns.testing import Watcher, memory_broker, running, watching
from uns_plant.cli import app
from uns_plant.graph import AssetGraph
from uns_plant.service import PlantService

LINE = "acme/pune/stamping/line-3"
PRESS_1 = f"{LINE}/cell-a/press-01"
PRESS_2 = f"{LINE}/cell-a/press-02"
ROBOT = f"{LINE}/cell-b/robot-01"
CONVEYOR = "acme/pune/stamping/line-4/cell-a/conveyor-01"
PLANT = [
    Device(path=PRESS_1, asset="press", feeds=[ROBOT], criticality="critical"),
    Device(path=PRESS_2, asset="press", feeds=[ROBOT]),
    Device(path=ROBOT, asset="robot", feeds=[CONVEYOR], criticality="high"),
    Device(path=CONVEYOR, asset="conveyor", criticality="low"),
]


def health(w: Watcher, group: str) -> Health | None:
    """The latest retained health of ``group`` the watcher has seen."""
    for m in reversed(w.messages):
        if m.topic == f"{group}/_health" and m.payload:
            return decode(m.payload, Health)
    return None


async def until(w: Watcher, group: str, state: HealthState) -> Health:
    await w.wait(lambda: (h := health(w, group)) is not None and h.state == state)
    h = health(w, group)
    assert h is not None
    return h


async def born(w: Watcher) -> None:
    for path in (d.path for d in PLANT):
        birth = DeviceBirth(
            ts=1, node="sim", device=path.rsplit("/", 1)[1], bdseq=0, seq=0, metrics=[]
        )
        await w.publish(f"{path}/raw/birth", birth, retain=True)


def event(device: str, state: str, severity: str = "critical") -> Event:
    return Event(
        ts=2,
        id=f"e-{device.rsplit('/', 1)[1]}",
        kind="anomaly",
        state=state,  # type: ignore[arg-type]
        device=device,
        started=1,
        severity=severity,  # type: ignore[arg-type]
    )


async def test_a_critical_event_on_a_critical_asset_makes_its_line_critical_until_cleared(
    tmp_path: Path,
) -> None:
    async with (
        memory_broker() as url,
        watching(url, "acme/#") as w,
        running(PlantService, url, "acme", plant=PLANT, state_file=str(tmp_path / "events.json")),
    ):
        await born(w)
        await until(w, LINE, "ok")
        await w.publish(f"{PRESS_1}/events/anomaly", event(PRESS_1, "raised"))
        line = await until(w, LINE, "critical")
        cell = await until(w, f"{LINE}/cell-a", "critical")
        site = await until(w, "acme/pune", "critical")
        await w.publish(f"{PRESS_1}/events/anomaly", event(PRESS_1, "cleared"))
        await until(w, LINE, "ok")
        assert health(w, f"{LINE}/cell-a").state == "ok"  # type: ignore[union-attr]
    assert [c.device for c in line.causes] == [PRESS_1] and line.open_events == 1
    assert cell.level == "cell" and site.level == "site" and line.devices == 3
    assert health(w, "acme/pune/stamping/line-4").state == "ok"  # type: ignore[union-attr]


async def test_a_device_going_offline_changes_its_line_and_coming_back_restores_it(
    tmp_path: Path,
) -> None:
    async with (
        memory_broker() as url,
        watching(url, "acme/#") as w,
        running(PlantService, url, "acme", plant=PLANT, state_file=str(tmp_path / "events.json")),
    ):
        await born(w)
        await until(w, LINE, "ok")
        death = DeviceDeath(ts=3, node="sim", device="robot-01", bdseq=0, seq=1)
        await w.publish(f"{ROBOT}/raw/death", death, retain=True)
        line = await until(w, LINE, "critical")
        assert health(w, f"{LINE}/cell-a").state == "ok"  # type: ignore[union-attr]
        birth = DeviceBirth(ts=4, node="sim", device="robot-01", bdseq=1, seq=0, metrics=[])
        await w.publish(f"{ROBOT}/raw/birth", birth, retain=True)
        await until(w, LINE, "ok")
    assert line.offline == 1 and line.causes[0].reason == "offline on a high asset"


async def test_a_medium_or_low_asset_makes_its_line_at_most_warning(tmp_path: Path) -> None:
    async with (
        memory_broker() as url,
        watching(url, "acme/#") as w,
        running(PlantService, url, "acme", plant=PLANT, state_file=str(tmp_path / "events.json")),
    ):
        await born(w)
        await until(w, LINE, "ok")
        await w.publish(f"{PRESS_2}/events/anomaly", event(PRESS_2, "raised"))
        line = await until(w, LINE, "warning")
    assert line.causes[0].device == PRESS_2


def test_upstream_and_downstream_follow_feeds_nearest_first():
    graph = AssetGraph(PLANT)
    assert graph.upstream(CONVEYOR) == [ROBOT, PRESS_1, PRESS_2]
    assert graph.downstream(PRESS_1) == [ROBOT, CONVEYOR]
    assert graph.upstream(PRESS_1) == [] and graph.downstream(CONVEYOR) == []


def test_the_command_line_answers_on_the_example_plant():
    devices = load(EXAMPLE_CONFIG, environ={}).config.plant.devices
    fed = next(d for d in devices if d.feeds)
    result = CliRunner().invoke(app, ["downstream", fed.path, "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 0 and fed.feeds[0] in result.output.splitlines()
    result = CliRunner().invoke(app, ["upstream", fed.feeds[0], "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 0 and fed.path in result.output.splitlines()


def test_an_unknown_device_exits_2(tmp_path: Path):
    result = CliRunner().invoke(
        app, ["upstream", f"{LINE}/cell-z/ghost", "--config", str(EXAMPLE_CONFIG)]
    )
    assert result.exit_code == 2 and "not a device of the plant" in result.output


def test_every_command_has_a_help_page():
    for command in ("health", "upstream", "downstream"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output


def test_upstream_of_the_example_plants_robot_is_its_conveyor_then_the_four_presses():
    robot = "acme/pune/stamping/line-3/cell-b/robot-01"
    result = CliRunner().invoke(app, ["upstream", robot, "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "acme/pune/stamping/line-3/cell-b/conveyor-01",
        *(f"acme/pune/stamping/line-3/cell-a/press-0{n}" for n in range(1, 5)),
    ]
    result = CliRunner().invoke(app, ["downstream", robot, "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 0 and result.output == ""
    result = CliRunner().invoke(
        app, ["upstream", "acme/pune/x/y/z/nope", "--config", str(EXAMPLE_CONFIG)]
    )
    assert result.exit_code == 2 and "not a device of the plant" in result.output


async def test_an_unreadable_state_file_is_logged_and_the_service_starts_without(
    tmp_path: Path, caplog
) -> None:
    state = tmp_path / "events.json"
    state.write_text("not json", encoding="utf-8")
    async with (
        memory_broker() as url,
        watching(url, "acme/#") as w,
        running(PlantService, url, "acme", plant=PLANT, state_file=str(state)),
    ):
        await born(w)
        await until(w, LINE, "ok")
        await w.publish(f"{PRESS_1}/events/anomaly", event(PRESS_1, "raised"))
        await until(w, LINE, "critical")
    assert "not a state file" in caplog.text
    assert b'"e-press-01"' in state.read_bytes()  # written anew
