"""Featurizer against hostile input (issue 15): every bad value is a counted exclusion or
drop, never an exception or a hang, and never moves or stops a tag's windows."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import numpy as np
import pytest

from fixtures.logs import capturing_logs
from uns import (
    Bus,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Metric,
    MetricDef,
    Node,
    Waveform,
    connect,
    decode,
    encode,
    now_ms,
)
from uns.testing import Watcher, running, watching
from uns_featurizer import Featurizer
from uns_featurizer.windows import SlowWindow, TimeBounds, WaveformWindow

FS = 10_000.0
NOW = 1_800_000_000_000  # the box's clock in the pure tests (2027-01-15)
BOUNDS = TimeBounds(max_future_ms=300_000, max_jump_ms=3_600_000, resync_after=3)
YEAR_MS = 365 * 86_400_000


def block(
    t0_us: int, *, n: int = 1000, rate: float = FS, value: float = 1.0, **kw: Any
) -> Waveform:
    x = np.full(n, value, dtype=np.float32)
    return Waveform.from_values(x, t0_us=t0_us, rate_hz=rate, **kw)


def raw_block(samples: bytes, **fields: Any) -> Waveform:
    """A block as a decoder could hand it over, whatever its fields say."""
    return Waveform(**{"t0_us": NOW * 1000, "rate_hz": FS, "samples": samples, **fields})


# ---- waveform blocks ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, -10_000.0, math.nan, math.inf, 1e12, 1e-300])
def test_a_block_at_a_rate_of_zero_or_nonsense_is_refused_and_counted(rate: float) -> None:
    w = WaveformWindow(length=2000, hop=2000)
    assert w.add(block(0, rate=rate), seq=0, node="a") == []
    assert w.excluded.counts["rate"] == 1000
    out = [win for i in range(2) for win in w.add(block(i * 100_000), seq=i, node="a")]
    assert len(out) == 1 and out[0][2].good == 2000  # the stream goes on


@pytest.mark.parametrize(
    ("samples", "fields"),
    [
        (b"\0" * 1001, {}),  # 250.25 float32 samples
        (b"\0" * 3, {"dtype": "i16"}),
        (b"\0" * 12, {"dtype": "f64"}),
        (b"", {}),
        (b"\0" * 4 * 100_001, {}),  # above waveform.max_block
    ],
)
def test_bytes_that_are_not_whole_samples_or_too_many_are_refused(
    samples: bytes, fields: dict[str, Any]
) -> None:
    w = WaveformWindow(length=1000, hop=1000)
    assert w.add(raw_block(samples, **fields), seq=0, node="a") == []
    assert w.excluded.counts["samples"] >= 1
    assert len(w.add(block(0), seq=1, node="a")) == 1


@pytest.mark.parametrize("scale", [0.0, math.nan, math.inf, -math.inf])
def test_a_zero_or_non_finite_scale_is_refused(scale: float) -> None:
    w = WaveformWindow(length=1000, hop=1000)
    assert w.add(block(0, scale=scale), seq=0, node="a") == []
    assert w.excluded.counts["scale"] == 1000


def test_a_block_at_another_rate_than_its_birth_announced_is_refused() -> None:
    w = WaveformWindow(length=1000, hop=1000)
    assert w.add(block(0, rate=20_000.0), seq=0, node="a", rate_hz=FS) == []
    assert w.excluded.counts["rate"] == 1000
    assert len(w.add(block(0), seq=1, node="a", rate_hz=FS)) == 1


def test_huge_scales_give_non_finite_samples_that_are_counted_not_windowed_as_good() -> None:
    w = WaveformWindow(length=1000, hop=1000)
    out = w.add(block(0, scale=1e300), seq=0, node="a")
    assert out[0][2].good == 0 and w.excluded.counts["nan"] == 1000


@pytest.mark.parametrize("t0_us", [2**63 - 1, (NOW + 31 * YEAR_MS) * 1000, 0, -(2**63), 10**40])
def test_a_block_stamped_far_away_is_refused_and_the_stream_runs_on_as_before(t0_us: int) -> None:
    w = WaveformWindow(length=2000, hop=2000, bounds=BOUNDS)
    t0 = (NOW - 60_000) * 1000
    out = w.add(block(t0), seq=0, node="a", now_ms=NOW)
    out += w.add(block(t0_us), seq=1, node="a", now_ms=NOW)
    for i in range(1, 4):
        out += w.add(block(t0 + i * 100_000), seq=i + 1, node="a", now_ms=NOW)
    assert w.excluded.counts["timestamp"] == 1000
    assert w.excluded.counts["gap"] == 0  # the refused block left no hole in the run
    assert [prov.start for _, _, prov in out] == [NOW - 60_000, NOW - 59_800]
    assert "timestamp" in w.excluded.details


def test_a_block_whose_end_lies_too_far_ahead_is_refused() -> None:
    w = WaveformWindow(length=1000, hop=1000, bounds=BOUNDS, min_rate_hz=1.0)
    assert w.add(block(NOW * 1000, rate=1.0), seq=0, node="a", now_ms=NOW) == []  # 1000 s long
    assert w.excluded.counts["timestamp"] == 1000


def test_a_stream_whose_time_moves_back_is_taken_up_again_after_three_blocks() -> None:
    w = WaveformWindow(length=1000, hop=1000, bounds=BOUNDS)
    t0 = (NOW - 1000) * 1000
    assert len(w.add(block(t0), seq=0, node="a", now_ms=NOW)) == 1
    back = t0 - 2 * 86_400_000_000  # two days back: a clock set right, or a replay restarted
    out = []
    for i in range(3):
        out += w.add(block(back + i * 100_000), seq=i + 1, node="a", now_ms=NOW)
    assert [prov.start for _, _, prov in out] == [(back + i * 100_000) // 1000 for i in range(3)]
    assert w.excluded.counts["out_of_order"] == 0


# ---- slow tags ----------------------------------------------------------------------------


def slow_run(w: SlowWindow, ts: list[int], value: Any = 1.0, now: int = NOW) -> list[Any]:
    return [
        win
        for i, t in enumerate(ts)
        for win in w.add(t, value, good=True, seq=i, node="a", now_ms=now)
    ]


@pytest.mark.parametrize("bad_ts", [2**63 - 1, NOW + 31 * YEAR_MS, 2**64 + 5, 10**400])
def test_one_sample_stamped_far_ahead_is_refused_and_the_tag_keeps_its_windows(
    bad_ts: int,
) -> None:
    w = SlowWindow(length_ms=1000, hop_ms=1000, bounds=BOUNDS)
    base = NOW - 10_000
    out = slow_run(w, [base + i * 100 for i in range(15)])
    out += w.add(bad_ts, 5.0, good=True, seq=99, node="a", now_ms=NOW)
    out += slow_run(w, [base + 1500 + i * 100 for i in range(20)])
    ends = [prov.end for _, _, prov in out]
    assert ends == [base + 1000 * k for k in range(1, 4)]  # nothing lost, nothing moved
    assert w.excluded.counts["timestamp"] == 1 and w.excluded.counts["out_of_order"] == 0
    assert out[0][2].total == 10 and out[1][2].total == 11  # the refused one was seen in it


@pytest.mark.parametrize("bad_ts", [0, -(2**63), NOW - 40 * YEAR_MS])
def test_a_sample_stamped_before_2000_is_refused(bad_ts: int) -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    assert w.add(bad_ts, 1.0, good=True, seq=0, node="a", now_ms=NOW) == []
    assert w.excluded.counts["timestamp"] == 1


def test_max_past_refuses_what_is_older_than_it() -> None:
    bounds = TimeBounds(max_past_ms=86_400_000)
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=bounds)
    w.add(NOW - 2 * 86_400_000, 1.0, good=True, seq=0, node="a", now_ms=NOW)
    assert w.excluded.counts["timestamp"] == 1
    assert "behind this box's clock" in w.excluded.details["timestamp"]


def test_without_a_clock_a_year_long_gap_jumps_to_the_window_of_the_new_sample() -> None:
    # On the old code this closed the empty windows one hop (1 ms) at a time: 3e10 of them.
    w = SlowWindow(length_ms=10, hop_ms=1)
    out = [win for t in (0, 5) for win in w.add(t, 1.0, good=True, seq=None, node="a")]
    far = YEAR_MS
    out += w.add(far, 2.0, good=True, seq=None, node="a")
    out += w.add(far + 1, 3.0, good=True, seq=None, node="a")
    assert out[-1][2].end == far + 1 and list(out[-1][1]) == [2.0]
    assert {prov.end for _, _, prov in out} <= set(range(1, 16)) | {far + 1}


def test_a_single_jump_is_held_and_given_up_when_the_stream_goes_on() -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    base = NOW - 30 * 86_400_000  # a replay of last month, in the featurizer's past
    out = slow_run(w, [base + i * 100 for i in range(15)])
    out += w.add(NOW - 1000, 9.0, good=True, seq=50, node="a", now_ms=NOW)  # a stamp of today
    out += slow_run(w, [base + 1500 + i * 100 for i in range(20)])
    assert [prov.end for _, _, prov in out] == [base + 1000 * k for k in range(1, 4)]
    assert w.excluded.counts["timestamp"] == 1
    assert all(9.0 not in values for _, values, _ in out)


def test_three_samples_that_agree_on_a_new_time_restart_the_windows_there() -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    base = NOW - 30 * 86_400_000
    out = slow_run(w, [base + i * 100 for i in range(15)])
    today = NOW - 10_000
    out += slow_run(w, [today + i * 100 for i in range(30)], value=7.0)
    ends = [prov.end for _, _, prov in out]
    assert ends[:3] == [base + 1000, base + 2000, base + 3000]  # the month-old ones, closed
    assert all(end > today for end in ends[3:])  # then today's, nothing in between
    today_windows = [v for _, v, prov in out if prov.end > today]
    assert len(today_windows) >= 2 and all(set(v) == {7.0} for v in today_windows)
    assert w.excluded.counts["timestamp"] == 0  # the held samples were windowed, not lost


def test_a_tag_silent_for_days_is_no_jump() -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    t = NOW - 3 * 86_400_000
    w.add(t, 1.0, good=True, seq=0, node="a", now_ms=t + 50)
    w.add(NOW - 50, 2.0, good=True, seq=1, node="a", now_ms=NOW)  # the box's clock moved too
    assert w.excluded.counts["timestamp"] == 0 and w._clock.held == []


def test_an_integer_beyond_64_bits_is_counted_not_a_crash() -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    base = NOW - 10_000
    out = slow_run(w, [base + i * 100 for i in range(5)])
    out += w.add(base + 500, 2**64 + 1, good=True, seq=5, node="a", now_ms=NOW)
    out += w.add(base + 600, 10**400, good=True, seq=6, node="a", now_ms=NOW)
    out += slow_run(w, [base + 700 + i * 100 for i in range(10)])
    assert w.excluded.counts["range"] == 2
    assert out[0][2].good == 8 and out[0][2].total == 10


def test_a_string_where_a_number_was_declared_counts_in_the_window_total() -> None:
    w = SlowWindow(length_ms=2000, hop_ms=1000, bounds=BOUNDS)
    base = NOW - 10_000
    out = []
    for i in range(12):
        refuse = ("type", "a str value, declared float") if i == 3 else None
        out += w.add(base + i * 100, 1.0, good=True, seq=i, node="a", now_ms=NOW, refuse=refuse)
    assert out[0][2].good == 9 and out[0][2].total == 10
    assert w.excluded.counts["type"] == 1


# ---- the service on the in-memory bus ------------------------------------------------------


def excluded(node: Node[Any], reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "uns_featurizer_samples_excluded_total", {"service": "featurizer", "reason": reason}
    )
    return value or 0.0


def drops(node: Node[Any], reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "uns_messages_dropped_total", {"service": "featurizer", "reason": reason}
    )
    return value or 0.0


SLOW = {"window_s": 1, "hop_s": 0.5}
WAVE = {"window": 2000}


class Adapter:
    """Publishes what an adapter would for one device: a birth, then data near the clock."""

    def __init__(self, bus: Bus, device: str, node: str = "adapter") -> None:
        self.bus, self.device, self.node = bus, device, node
        self.t = now_ms() - 30_000
        self.block = 0
        self.seq = 0

    async def birth(self, bdseq: int = 0, node: str | None = None) -> None:
        birth = DeviceBirth(
            ts=now_ms(),
            node=node or self.node,
            device=self.device,
            bdseq=bdseq,
            seq=0,
            metrics=[
                MetricDef(name="vibration", datatype="waveform", unit="g", rate_hz=FS),
                MetricDef(name="bearing_temp", datatype="float", unit="degC"),
            ],
        )
        await self.bus.publish(f"{self.device}/raw/birth", encode(birth), qos=1, retain=True)

    async def data(self, n: int = 1, *, temp: float = 50.0, node: str | None = None) -> None:
        """``n`` messages 100 ms apart: a waveform block and a temperature each."""
        for _ in range(n):
            self.t += 100
            metrics = [
                Metric(name="vibration", value=block(self.t * 1000, value=1.0, block=self.block)),
                Metric(name="bearing_temp", value=temp),
            ]
            await self.send(metrics, node=node)
            self.block += 1

    async def send(
        self, metrics: list[Metric], *, ts: int | None = None, node: str | None = None
    ) -> None:
        self.seq = (self.seq + 1) % 256
        data = DeviceData(ts=ts or self.t, node=node or self.node, seq=self.seq, metrics=metrics)
        await self.bus.publish(f"{self.device}/raw/data", encode(data), qos=1)


def features_after(w: Watcher, signal: str, after: int) -> Any:
    """A predicate: a features message of ``signal`` whose window starts at ``after`` or later."""

    def match(m: Any) -> bool:
        if not m.topic.endswith("/features/data") or f'"{signal}.'.encode() not in m.payload:
            return False
        data = decode(m.payload, DeviceData)
        return data.window is not None and data.window.start >= after

    return match


async def test_each_payload_that_crashed_the_featurizer_is_now_a_counted_exclusion(
    memory_url: str, prefix: str
) -> None:
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    async with (
        running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as bus,
    ):
        a = Adapter(bus, dev)
        await a.birth()
        await a.data(5)
        t = a.t * 1000
        await a.send([Metric(name="vibration", value=block(t, rate=0.0))])  # ZeroDivisionError
        await a.send(
            [Metric(name="vibration", value=raw_block(b"\0" * 1001, t0_us=t))]
        )  # ValueError
        await a.send([Metric(name="bearing_temp", value=2**64 + 1)])  # TypeError from isfinite
        await a.send([Metric(name="bearing_temp", value="hot")])
        await a.send([Metric(name="bearing_temp", value=True)])
        await a.send([Metric(name="vibration", value=21.5)])
        after = a.t + 100
        await a.data(30)
        await w.wait_for(features_after(w, "vibration", after))
        await w.wait_for(features_after(w, "bearing_temp", after))
        assert excluded(node, "rate") == 1000 and excluded(node, "samples") == 1
        assert excluded(node, "range") == 1 and excluded(node, "type") == 3


async def test_a_stamp_of_2_63_or_31_years_ahead_neither_hangs_nor_stops_the_tags_features(
    memory_url: str, prefix: str
) -> None:
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    with capturing_logs("uns_featurizer") as records:
        async with (
            running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node,
            watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
            connect(memory_url) as bus,
        ):
            a = Adapter(bus, dev)
            await a.birth()
            await a.data(12)
            await w.wait_for(features_after(w, "bearing_temp", 0))
            years_31 = now_ms() + 31 * YEAR_MS
            for bad in (2**63 - 1, years_31):
                await a.send([Metric(name="bearing_temp", value=99.0, ts=bad)])
                await a.send(
                    [Metric(name="vibration", value=block(bad * 1000 if bad < 2**53 else bad))]
                )
            after = a.t
            await a.data(30)
            temp = await w.wait_for(features_after(w, "bearing_temp", after))
            await w.wait_for(features_after(w, "vibration", after))
        feats = {m.name: m.value for m in decode(temp.payload, DeviceData).metrics}
        assert feats["bearing_temp.max"] == 50.0  # the forged 99 never got into a window
        assert excluded(node, "timestamp") == 2 + 2 * 1000
        assert excluded(node, "out_of_order") == 0
    lines = [r.getMessage() for r in records.of("uns_featurizer")]
    assert any("ahead of this box's clock" in line for line in lines), lines


async def test_data_and_deaths_from_a_node_that_did_not_announce_the_device_are_dropped(
    memory_url: str, prefix: str
) -> None:
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    with capturing_logs("uns_featurizer") as records:
        async with (
            running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node,
            watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
            connect(memory_url) as bus,
        ):
            a = Adapter(bus, dev)
            await a.birth(bdseq=5)
            await a.data(5)
            await a.data(5, temp=500.0, node="intruder")  # forged: must not be windowed
            forged = DeviceDeath(ts=now_ms(), node="intruder", device=dev, bdseq=5, seq=0)
            await bus.publish(f"{dev}/raw/death", encode(forged), qos=1)
            stale = DeviceDeath(ts=now_ms(), node="adapter", device=dev, bdseq=4, seq=0)
            await bus.publish(f"{dev}/raw/death", encode(stale), qos=1)
            after = a.t
            await a.data(20)
            temp = await w.wait_for(features_after(w, "bearing_temp", after))
            assert drops(node, "foreign_node") == 6 and drops(node, "stale_death") == 1
            published = [decode(m.payload, DeviceData) for m in w.seen]
            assert all(d.window is not None and d.window.node == "adapter" for d in published)
            assert all(
                m.value != 500.0 for d in published for m in d.metrics if m.name.endswith(".max")
            )

            real = DeviceDeath(ts=now_ms(), node="adapter", device=dev, bdseq=5, seq=0)
            await bus.publish(f"{dev}/raw/death", encode(real), qos=1)
            await records.wait(
                lambda: any("stops windowing" in r.getMessage() for r in records.records)
            )
            await a.data(3)  # after the death, without a birth: not windowed
            await a.birth(bdseq=6)
            after = a.t
            await a.data(20)
            await w.wait_for(features_after(w, "bearing_temp", after))
            assert drops(node, "unannounced") == 3
    assert temp is not None
    assert any("announced again" in r.getMessage() for r in records.records)


async def test_a_topic_that_is_no_device_path_is_a_counted_drop(
    memory_url: str, prefix: str
) -> None:
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    async with (
        running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as bus,
    ):
        a = Adapter(bus, dev)
        bad = DeviceData(ts=now_ms(), node="x", seq=0, metrics=[Metric(name="t", value=1.0)])
        await bus.publish(f"{prefix}/pune/Not A Slug/line-3/cell-a/press-01/raw/data", encode(bad))
        birth = DeviceBirth(ts=now_ms(), node="x", device="", bdseq=0, seq=0, metrics=[])
        await bus.publish(f"{prefix}/pune/_node/line-3/cell-a/press-01/raw/birth", encode(birth))
        await a.birth()
        await a.data(25)
        await w.wait_for(features_after(w, "bearing_temp", 0))
        assert drops(node, "topic") == 2


async def test_values_whose_statistics_overflow_are_counted_not_published_as_null(
    memory_url: str, prefix: str
) -> None:
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    async with (
        running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as bus,
    ):
        a = Adapter(bus, dev)
        await a.birth()
        for i in range(25):
            a.t += 100
            await a.send([Metric(name="bearing_temp", value=1e308 if i % 2 else -1e308)])
        await w.wait_for(features_after(w, "bearing_temp", 0))
        for m in w.seen:
            assert all(isinstance(x.value, float) for x in decode(m.payload, DeviceData).metrics)
        assert excluded(node, "overflow") >= 1


async def test_no_hostile_message_takes_long(memory_url: str, prefix: str) -> None:
    """One message each of the kinds above, timed in the handler: none may hang it."""
    dev = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    async with running(Featurizer, memory_url, prefix, slow=SLOW, waveform=WAVE) as node:
        f = node.running
        assert isinstance(f, Featurizer)
        from uns import Inbound

        topic = f"{dev}/raw/data"
        base = now_ms() - 10_000

        def data(*metrics: Metric, ts: int = base) -> Inbound[DeviceData]:
            return Inbound(
                topic, DeviceData(ts=ts, node="adapter", seq=0, metrics=list(metrics)), False
            )

        await f.on_data(data(Metric(name="bearing_temp", value=1.0)))
        loop = asyncio.get_running_loop()
        for msg in [
            data(Metric(name="bearing_temp", value=1.0, ts=2**63 - 1)),
            data(Metric(name="bearing_temp", value=1.0), ts=2**63 - 1),
            data(Metric(name="bearing_temp", value=1.0, ts=base + 31 * YEAR_MS)),
            data(Metric(name="vibration", value=block(2**63 - 1))),
            data(Metric(name="vibration", value=block(0, rate=1e-300))),
        ]:
            started = loop.time()
            await f.on_data(msg)
            assert loop.time() - started < 10.0  # a hang bound, not a speed target
        assert excluded(node, "timestamp") == 3 + 1000 and excluded(node, "rate") == 1000


def test_logging_is_throttled_for_a_flood_of_bad_stamps(caplog: pytest.LogCaptureFixture) -> None:
    from uns import Throttled

    t = Throttled(every_s=60, logger=logging.getLogger("uns_featurizer.service"))
    with caplog.at_level(logging.WARNING, logger="uns_featurizer"):
        for _ in range(1000):
            t.warning("timestamp", "bad %s", "stamp")
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("timestamps: {max_future_s: -5}", "services.featurizer.timestamps.max_future_s"),
        ("timestamps: {resync_after: 0}", "services.featurizer.timestamps.resync_after"),
        ("waveform: {max_rate_hz: 0}", "services.featurizer.waveform.max_rate_hz"),
        ("waveform: {min_rate_hz: 5000, max_rate_hz: 100}", "services.featurizer.waveform"),
        ("max_devices: 0", "services.featurizer.max_devices"),
    ],
)
def test_a_bad_bound_is_refused_naming_the_field(tmp_path: Any, section: str, field: str) -> None:
    import subprocess
    import sys

    config = tmp_path / "plant.yaml"
    config.write_text(f"services:\n  featurizer:\n    {section}\n")
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "featurizer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert field in result.stderr and "Traceback" not in result.stderr
