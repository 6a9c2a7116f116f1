"""OEE from run state and counters (uns_plant.oee), against the simulator's ground truth over
a simulated 8-hour shift, and the cases a plant throws at it: counter resets and rollovers,
a device dying mid-shift, a machine without a quality counter, a shift past midnight."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from uns.config import load
from uns.errors import ConfigError
from uns_plant.oee import MINUTE_MS, AssetSpec, Calendar, DeviceOee, ShiftSpec, Totals, totals
from uns_plant.settings import PlantSettings
from uns_simulator import ASSETS, Machine
from uns_simulator.physics import Production

DAY = datetime(2026, 12, 2, tzinfo=UTC)
T0 = int(DAY.replace(hour=6).timestamp() * 1000)
"""06:00, the start of the early shift."""
SHIFT = ShiftSpec("early", 6 * 60, 8 * 60, breaks=((3 * 60, 15), (6 * 60, 30)))
PRESS = AssetSpec(ideal_cycle_s=2.0, counter="stroke_count", scrap="scrap_count")
ROBOT = AssetSpec(ideal_cycle_s=5.0, counter="cycle_count")


def shift_totals(*devices: DeviceOee, end: int = T0 + 8 * 3600_000) -> Totals:
    for d in devices:
        d.advance(end)
    return totals(devices, T0 // MINUTE_MS, (end - 1) // MINUTE_MS)


def test_oee_of_a_simulated_shift_matches_the_ground_truth_within_1_percent_per_factor() -> None:
    calendar = Calendar([SHIFT])
    plan = Production(
        planned_stops=((3 * 3600, 15 * 60), (6 * 3600, 30 * 60)),  # the calendar's breaks
        breakdowns_per_h=0.5,
        breakdown_s=600,
        micro_stops_per_h=20,
        micro_stop_s=30,
        scrap_rate=0.03,
    )
    machine = Machine("press", 7, rate_hz=1000, production=plan)
    machine.count = 2**32 - 2000.0  # the stroke counter rolls over an hour into the shift
    machine.step(0.0)
    tags = {t.state: t.name for t in ASSETS["press"]}
    press = DeviceOee("press-01", PRESS, calendar)
    press.datatypes({"stroke_count": "uint32", "scrap_count": "uint32", "run_state": "bool"})
    step_s, last_state = 0.5, None
    for i in range(int(8 * 3600 / step_s)):
        ts = T0 + round(i * step_s * 1000)
        readings = machine.readings()
        running = readings["running"][0]
        if running != last_state:  # the adapter reports a change at once
            press.sample(ts, tags["running"], running)
            last_state = running
        if i % 2 == 0:  # the counters are polled every second
            press.sample(ts, tags["count"], readings["count"][0])
            press.sample(ts, tags["scrap"], readings["scrap"][0])
        machine.step(step_s)
    t = shift_totals(press)
    truth = machine.truth
    planned = 8 * 3600 - truth.planned_stop_s
    true_a = truth.run_s / planned
    true_p = truth.count * machine.ideal_cycle_s / truth.run_s
    true_q = (truth.count - truth.scrap) / truth.count
    assert truth.planned_stop_s == 45 * 60 and truth.down_s > 0 and truth.micro_stop_s > 0
    assert t.planned_s == pytest.approx(planned)
    for got, want in ((t.availability, true_a), (t.performance, true_p), (t.quality, true_q)):
        assert got == pytest.approx(want, rel=0.01)
    assert 0.8 < true_a < 0.99 and 0.75 < true_p < 0.95 and 0.95 < true_q < 0.99  # losses shown
    assert t.flags == {"counter_rollover": ["press-01"]}
    assert t.oee == pytest.approx(t.availability * t.performance * t.quality)


def test_a_reset_counter_counts_on_from_zero_and_is_flagged() -> None:
    press = DeviceOee("press-01", PRESS, Calendar([SHIFT]))
    press.datatypes({"stroke_count": "uint32"})
    press.sample(T0, "run_state", True)
    press.sample(T0, "stroke_count", 5000)
    press.sample(T0 + 60_000, "stroke_count", 5030)
    press.sample(T0 + 120_000, "stroke_count", 12)  # zeroed by the operator, 12 since
    t = shift_totals(press, end=T0 + 180_000)
    assert t.count == 42 and t.flags["counter_reset"] == ["press-01"]


def test_a_device_that_dies_mid_shift_loses_its_dead_time_and_is_flagged() -> None:
    robot = DeviceOee("robot-01", ROBOT, Calendar([SHIFT]))
    robot.sample(T0, "run_state", True)
    robot.sample(T0, "cycle_count", 0)
    robot.death(T0 + 3600_000)  # 07:00 to 07:30: nobody knows what it did
    robot.birth(T0 + 5400_000)
    robot.sample(T0 + 5400_000, "cycle_count", 720 + 360)  # it counted on meanwhile
    t = shift_totals(robot, end=T0 + 7200_000)
    assert t.planned_s == 7200 and t.run_s == 5400
    assert t.availability == 0.75 and t.flags["offline"] == ["robot-01"]
    assert t.count == 1080  # its counter kept what it made while unseen


def test_without_a_quality_counter_quality_is_1_and_flagged() -> None:
    calendar = Calendar([SHIFT])
    robot = DeviceOee("robot-01", ROBOT, calendar)
    press = DeviceOee("press-01", PRESS, calendar)
    for d, counter in ((robot, "cycle_count"), (press, "stroke_count")):
        d.sample(T0, "run_state", True)
        d.sample(T0, counter, 0)
    robot.sample(T0 + 600_000, "cycle_count", 100)
    press.sample(T0, "scrap_count", 0)
    press.sample(T0 + 600_000, "stroke_count", 300)
    press.sample(T0 + 600_000, "scrap_count", 30)
    alone = shift_totals(robot, end=T0 + 600_001)
    assert alone.quality == 1.0 and alone.flags == {"quality_assumed": ["robot-01"]}
    cell = shift_totals(robot, press, end=T0 + 600_001)
    # the cell: 400 made, 30 scrapped; the robot's 100 counted good (flagged)
    assert (cell.count, cell.good, cell.scrap) == (400, 370, 30)
    assert cell.ideal_count == pytest.approx(600.001 / 5 + 600.001 / 2)
    assert cell.performance == pytest.approx(400 / 420, rel=1e-4)


def test_breaks_are_not_planned_time_and_a_night_shift_runs_past_midnight() -> None:
    night = ShiftSpec("night", 22 * 60, 8 * 60, breaks=((4 * 60, 30),))  # 02:00-02:30
    calendar = Calendar([SHIFT, night])
    at = {h: int(DAY.replace(hour=h).timestamp() * 1000) for h in (1, 2, 3, 5, 9)}
    assert calendar.shift(at[1]) == ("night", at[1] - 3 * 3600_000, at[1] + 5 * 3600_000)
    assert calendar.planned(at[1]) and not calendar.planned(at[2]) and calendar.planned(at[3])
    assert calendar.shift(at[5]) == ("night", at[1] - 3 * 3600_000, at[1] + 5 * 3600_000)
    assert not calendar.planned(at[9]) and calendar.planned(at[9] + 15 * MINUTE_MS)
    assert calendar.shift(at[1] - 10 * 3600_000) is None  # 15:00 the day before: no shift


def test_a_bad_shift_time_or_zone_exits_2_naming_the_field(tmp_path: Path) -> None:
    def error(section: str) -> str:
        f = tmp_path / "plant.yaml"
        f.write_text(f"services:\n  plant:\n    oee:\n{section}", encoding="utf-8")
        with pytest.raises(ConfigError) as exc:
            load(f, environ={}).service("plant", PlantSettings)
        return str(exc.value)

    assert "services.plant.oee.shifts[0].start: '6am' is not HH:MM" in error(
        "      shifts: [{name: early, start: 6am}]\n"
    )
    assert "services.plant.oee.shifts[0].breaks[0]" in error(
        "      shifts: [{name: early, start: '06:00', hours: 1,\n"
        "                breaks: [{start: '06:50', minutes: 20}]}]\n"
    )
    assert "services.plant.oee.timezone: unknown time zone 'Mars/Base'" in error(
        "      timezone: Mars/Base\n"
    )


async def test_the_service_publishes_the_shift_then_its_final_then_the_next(tmp_path: Path) -> None:
    from uns import decode
    from uns.config import Device
    from uns.payloads import Oee
    from uns.testing import memory_broker, running, watching
    from uns_plant.service import PlantService

    line = "acme/pune/stamping/line-3"
    press = f"{line}/cell-a/press-01"
    shifts = [{"name": "early", "start": "06:00", "hours": 8}, {"name": "late", "start": "14:00"}]
    async with (
        memory_broker() as url,
        watching(url, f"{line}/#") as w,
        running(
            PlantService,
            url,
            "acme",
            plant=[Device(path=press, asset="press")],
            state_file=str(tmp_path / "e.json"),
            oee={"shifts": shifts, "publish_s": 3600},
        ) as node,
    ):
        service = node.running
        assert isinstance(service, PlantService)
        tracker = service.oee[press]
        end = T0 + 8 * 3600_000
        tracker.sample(end - 600_000, "run_state", True)
        tracker.sample(end - 600_000, "stroke_count", 0)
        tracker.sample(end - 1, "stroke_count", 300)
        await service.publish_oee(end - 1)  # the last moment of the early shift
        await service.publish_oee(end + 60_000)  # a minute into the late one
        topic = f"{line}/cell-a/_oee/shift"

        def shifts_seen() -> list[Oee]:
            return [decode(m.payload, Oee) for m in w.messages if m.topic == topic]

        await w.wait(lambda: len(shifts_seen()) == 3)
    early, final, late = shifts_seen()
    assert (early.shift, early.final, final.shift, final.final) == ("early", False, "early", True)
    assert final.count == 300 and final.run_s == pytest.approx(600) and final.performance == 1.0
    assert final.end == end - 1 and final.start == T0
    assert (late.shift, late.final, late.count) == ("late", False, 0)
    assert late.start == end and late.availability == 1.0  # running on since
