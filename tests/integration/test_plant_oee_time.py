"""OEE and hostile timestamps: a raw death stamped 2^63 - 1 ms or data 31 years ahead
(found by the system suite's fuzzing: the booking walked minute by minute towards it and
the watchdog restarted the plant service) is refused and counted, and the device's real
samples go on being booked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from uns import DeviceBirth, DeviceData, DeviceDeath, Metric, MetricDef, decode, now_ms
from uns.config import Device
from uns.payloads import Oee
from uns.testing import running, watching
from uns_plant.oee import MINUTE_MS, AssetSpec, Calendar, DeviceOee, ShiftSpec, plausible
from uns_plant.service import PlantService

LINE = "acme/pune/stamping/line-3"
PRESS = f"{LINE}/cell-a/press-01"
YEARS_31_MS = 31 * 365 * 24 * 3600_000


def test_only_timestamps_near_the_clock_are_booked_and_a_clock_jump_books_nothing() -> None:
    now = now_ms()
    assert plausible(now, now) and plausible(now - 3600_000, now)
    assert not plausible(2**63 - 1, now) and not plausible(now + YEARS_31_MS, now)
    assert not plausible(now - YEARS_31_MS, now) and not plausible(-(2**63), now)
    spec = AssetSpec(ideal_cycle_s=2.0, counter="stroke_count")
    press = DeviceOee(PRESS, spec, Calendar([ShiftSpec("all", 0, 24 * 60)]))
    press.sample(now, "run_state", True)
    press.advance(2**63 - 1)  # returns at once: nothing booked across the jump
    assert press.flags["clock_jump"] == (2**63 - 1) // MINUTE_MS
    assert sum(b.run_s for b in press.buckets.values()) == 0


async def test_hostile_timestamps_are_refused_counted_and_the_real_samples_still_count(
    amqtt_broker, tmp_path: Path
) -> None:
    url = amqtt_broker.url
    start = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%H:%M")
    async with (
        watching(url, f"{LINE}/#") as w,
        running(
            PlantService,
            url,
            "acme",
            plant=[Device(path=PRESS, asset="press")],
            state_file=str(tmp_path / "e.json"),
            oee={"shifts": [{"name": "early", "start": start, "hours": 1}], "publish_s": 0.2},
        ) as node,
    ):
        defs = [
            MetricDef(name="stroke_count", datatype="uint32"),
            MetricDef(name="run_state", datatype="bool"),
        ]
        birth = DeviceBirth(
            ts=now_ms(), node="sim", device="press-01", bdseq=0, seq=0, metrics=defs
        )
        await w.publish(f"{PRESS}/raw/birth", birth, retain=True)

        def data(seq: int, count: int, ts: int) -> DeviceData:
            metrics = [
                Metric(name="stroke_count", value=count),
                Metric(name="run_state", value=True),
            ]
            return DeviceData(ts=ts, node="sim", seq=seq, metrics=metrics)

        t = now_ms()
        await w.publish(f"{PRESS}/raw/data", data(1, 100, t))
        await w.publish(
            f"{PRESS}/raw/death",
            DeviceDeath(ts=2**63 - 1, node="sim", device="press-01", bdseq=0, seq=2),
        )
        await w.publish(f"{PRESS}/raw/birth", msgspec.structs.replace(birth, ts=now_ms(), seq=3))
        await w.publish(f"{PRESS}/raw/data", data(4, 105, t + YEARS_31_MS))
        for i, count in enumerate((110, 120), start=5):
            await w.publish(f"{PRESS}/raw/data", data(i, count, now_ms()))
        await w.wait(
            lambda: any(
                m.topic == f"{LINE}/_oee/shift" and m.payload and decode(m.payload, Oee).count == 20
                for m in w.messages
            )
        )
        refused = node.metrics.registry.get_sample_value(
            "uns_plant_oee_refused_total", {"service": "plant", "reason": "timestamp"}
        )
    assert refused is not None and refused >= 3  # the death, and both metrics 31 years ahead
