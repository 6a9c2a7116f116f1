"""Featurizer: the maths on known signals, the windowing rules, the service on the bus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uns import (
    DeviceBirth,
    DeviceData,
    Metric,
    MetricDef,
    Waveform,
    connect,
    encode,
)
from uns.testing import running, watching
from uns_featurizer import Featurizer, waveform_features
from uns_featurizer.features import BearingGeometry, slow_features
from uns_featurizer.windows import SlowWindow, WaveformWindow
from uns_simulator.physics import Machine

FS = 10_000.0


def test_a_pure_sine_has_the_textbook_statistics():
    t = np.arange(10_000) / FS
    f = waveform_features(np.sin(2 * np.pi * 50 * t), FS)
    assert f["rms"] == pytest.approx(1 / math.sqrt(2), rel=1e-3)
    assert f["crest"] == pytest.approx(math.sqrt(2), rel=1e-3)
    assert f["kurtosis"] == pytest.approx(1.5, rel=1e-2)
    assert f["dominant_hz"] == pytest.approx(50, abs=1)
    assert f["p2p"] == pytest.approx(2, rel=1e-3)


def test_gaussian_noise_has_kurtosis_three_and_band_energies_sum_to_the_variance():
    x = np.random.default_rng(1).normal(0, 0.5, 100_000)
    f = waveform_features(x, FS, bands=((0, 2500), (2500, 5001)))
    assert f["kurtosis"] == pytest.approx(3, abs=0.05)
    assert f["band_0_2500"] + f["band_2500_5001"] == pytest.approx(f["std"] ** 2, rel=1e-6)


def test_an_outer_race_defect_shows_in_the_envelope_at_bpfo():
    healthy, worn = Machine("press", 2), Machine("press", 2)
    worn.inject("bearing_wear", severity=0.6)
    shaft = healthy.shaft_hz
    h = waveform_features(healthy.vibration(10_000), FS, shaft_hz=shaft)
    w = waveform_features(worn.vibration(10_000), FS, shaft_hz=shaft)
    assert w["env_bpfo"] > 20 * h["env_bpfo"]
    assert w["env_bpfo"] > 3 * w["env_bpfi"]
    assert w["kurtosis"] > h["kurtosis"] + 1


def test_defect_frequencies_need_the_shaft_speed():
    f = waveform_features(np.random.default_rng(0).normal(size=1000), FS)
    assert "env_bpfo" not in f and "bpfo_band" not in f
    assert BearingGeometry().defect_hz(1796 / 60)["bpfo"] == pytest.approx(107.4, abs=0.2)


def test_the_slope_is_per_minute_and_nan_is_ignored():
    ts = np.array([0, 30_000, 60_000, 90_000])
    f = slow_features(ts, np.array([20.0, 20.5, np.nan, 21.5]))
    assert f["slope_per_min"] == pytest.approx(1.0)
    assert (f["min"], f["max"]) == (20.0, 21.5)


def block(i: int, n: int = 1000, *, value: float | None = None, t0: int | None = None) -> Waveform:
    x = np.full(n, value if value is not None else float(i), dtype=np.float32)
    return Waveform.from_values(x, t0_us=t0 if t0 is not None else i * 100_000, rate_hz=FS, block=i)


def test_waveform_windows_are_back_to_back_with_their_provenance():
    w = WaveformWindow(length=2000, hop=2000)
    out = [win for i in range(6) for win in w.add(block(i), seq=i + 10, node="a")]
    assert len(out) == 3
    samples, rate, prov = out[1]
    assert rate == FS and samples[0] == 2 and samples[-1] == 3
    assert (prov.start, prov.end, prov.good, prov.total) == (200, 400, 2000, 2000)
    assert (prov.seq_first, prov.seq_last, prov.node) == (12, 13, "a")


def test_overlapping_windows_slide_by_the_hop():
    w = WaveformWindow(length=2000, hop=1000)
    out = [win for i in range(4) for win in w.add(block(i), seq=i, node="a")]
    assert [int(s[0]) for s, _, _ in out] == [0, 1, 2]


def test_a_missing_block_never_ends_up_inside_a_window():
    w = WaveformWindow(length=2000, hop=2000)
    w.add(block(0), seq=0, node="a")
    out = w.add(block(2), seq=2, node="a")  # block 1 lost
    out += w.add(block(3), seq=3, node="a")
    assert len(out) == 1 and out[0][0][0] == 2
    assert w.excluded.counts["gap"] == 1000


def test_duplicated_and_out_of_order_blocks_are_excluded_and_counted():
    w = WaveformWindow(length=3000, hop=3000)
    w.add(block(0), seq=0, node="a")
    w.add(block(1), seq=1, node="a")
    w.add(block(1), seq=1, node="a")  # the same block again
    w.add(block(0), seq=0, node="a")  # older
    out = w.add(block(2), seq=2, node="a")
    assert len(out) == 1 and list(out[0][0][::1000]) == [0, 1, 2]
    assert w.excluded.counts["duplicate"] == 1000 and w.excluded.counts["out_of_order"] == 1000


def test_nan_samples_and_bad_blocks_do_not_count_as_good():
    w = WaveformWindow(length=1000, hop=1000)
    x = np.zeros(1000, dtype=np.float32)
    x[:10] = np.nan
    out = w.add(Waveform.from_values(x, t0_us=0, rate_hz=FS), seq=0, node="a")
    assert out[0][2].good == 990 and w.excluded.counts["nan"] == 10
    assert w.add(block(1), seq=1, node="a", good=False) == []
    assert w.excluded.counts["bad_quality"] == 1000


def test_slow_windows_follow_event_time_and_exclude_bad_samples():
    w = SlowWindow(length_ms=60_000, hop_ms=10_000)
    out = []
    for i, (ts, v, good) in enumerate(
        [
            (1_000, 1.0, True),
            (5_000, 2.0, False),
            (5_000, 3.0, True),
            (5_000, 4.0, True),
            (4_000, 5.0, True),
            (9_000, float("nan"), True),
            (12_000, 6.0, True),
        ]
    ):
        out += w.add(ts, v, good=good, seq=i, node="a")
    assert len(out) == 1  # the window ending at 10 s closed when the 12 s sample came
    ts, values, prov = out[0]
    assert list(values) == [1.0, 3.0]
    assert prov.end == 10_000 and prov.good == 2 and prov.total == 6
    assert dict(w.excluded.counts) == {
        "bad_quality": 1,
        "duplicate": 1,
        "out_of_order": 1,
        "nan": 1,
    }


def test_a_phase_moves_where_slow_windows_end_within_the_hop():
    w = SlowWindow(length_ms=20_000, hop_ms=10_000, phase_ms=2_500)
    out = []
    for ts in range(0, 30_001, 1_000):
        out += w.add(ts, float(ts), good=True, seq=None, node="a")
    assert [prov.end for _, _, prov in out] == [2_500, 12_500, 22_500]
    assert list(out[-1][1]) == [float(t) for t in range(3_000, 23_000, 1_000)]


@pytest.mark.parametrize("stagger", [True, False])
async def test_devices_close_their_slow_windows_at_their_own_moment_unless_told_not_to(
    memory_url, prefix, stagger
):
    devices = [f"{prefix}/pune/stamping/line-3/cell-a/press-0{i}" for i in (1, 2, 3)]
    async with (
        running(
            Featurizer,
            memory_url,
            prefix,
            plant=[(d, "press") for d in devices],
            slow={"window_s": 2, "hop_s": 1, "stagger": stagger},
        ),
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as pub,
    ):
        for i in range(40):  # 4 s of two tags every 100 ms on both presses
            t_ms = 1_700_000_000_000 + i * 100
            for d in devices:
                metrics = [
                    Metric(name="bearing_temp", value=50.0),
                    Metric(name="oil_temp", value=40.0),
                ]
                data = DeviceData(ts=t_ms, node="adapter", seq=i % 256, metrics=metrics)
                await pub.publish(f"{d}/raw/data", encode(data), qos=1)

        def two_windows_of_every_tag(_: object) -> bool:
            return all(
                sum(x.topic.startswith(d) and tag in x.payload for x in w.seen) >= 2
                for d in devices
                for tag in (b"bearing_temp", b"oil_temp")
            )

        await w.wait_for(two_windows_of_every_tag)
    from uns import decode

    phases: dict[str, set[int]] = {d: set() for d in devices}
    for m in w.seen:
        data = decode(m.payload)
        phases[m.topic.rsplit("/", 2)[0]].add(data.window.end % 1000)
    assert all(len(p) == 1 for p in phases.values()), phases  # a device's tags stay aligned
    ends = [p.pop() for p in phases.values()]
    if stagger:  # three offsets in 1,000 ms: all equal by chance one time in a million
        assert len(set(ends)) > 1, ends
    else:
        assert ends == [0, 0, 0]


async def test_the_service_publishes_feature_births_and_windows_with_provenance(memory_url, prefix):
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    machine = Machine("press", 3)
    machine.inject("bearing_wear", severity=0.5)
    async with (
        running(
            Featurizer,
            memory_url,
            prefix,
            plant=[(device, "press")],
            slow={"window_s": 2, "hop_s": 1},
        ),
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/#") as w,
        connect(memory_url) as pub,
    ):
        birth = DeviceBirth(
            ts=1,
            node="adapter",
            device=device,
            bdseq=0,
            seq=1,
            metrics=[
                MetricDef(name="vibration", datatype="waveform", unit="g", rate_hz=FS),
                MetricDef(name="motor_speed", datatype="float", unit="rpm"),
                MetricDef(name="bearing_temp", datatype="float", unit="degC"),
            ],
        )
        await pub.publish(f"{device}/raw/birth", encode(birth), qos=1, retain=True)
        for i in range(25):
            t_ms = 1_700_000_000_000 + i * 100
            data = DeviceData(
                ts=t_ms,
                node="adapter",
                seq=i % 256,
                metrics=[
                    Metric(
                        name="vibration",
                        value=Waveform.from_values(
                            machine.vibration(1000), t0_us=t_ms * 1000, rate_hz=FS, block=i
                        ),
                    ),
                    Metric(name="motor_speed", value=1480.0),
                    Metric(name="bearing_temp", value=50 + i * 0.1),
                ],
            )
            await pub.publish(f"{device}/raw/data", encode(data), qos=1)
        wave = await w.wait_for(
            lambda m: m.topic.endswith("/features/data") and b"vibration.rms" in m.payload
        )
        slow = await w.wait_for(
            lambda m: (
                m.topic.endswith("/features/data") and b"bearing_temp.slope_per_min" in m.payload
            )
        )
    from uns import decode

    wave_data: DeviceData = decode(wave.payload)
    feats = {m.name: m.value for m in wave_data.metrics}
    assert feats["vibration.env_bpfo"] > 0.05 and feats["vibration.kurtosis"] > 3
    assert wave_data.window.good == 10_000 and wave_data.window.node == "adapter"
    assert wave_data.window.seq_first == 0 and wave_data.window.seq_last == 9
    slope = {m.name: m.value for m in decode(slow.payload).metrics}["bearing_temp.slope_per_min"]
    assert slope == pytest.approx(60.0, rel=0.01)  # 0.1 degC per 100 ms
    births = [decode(m.payload) for m in w.seen if m.topic.endswith("/features/birth")]
    units = {d.name: d.unit for d in births[-1].metrics}
    assert units["vibration.rms"] == "g" and units["bearing_temp.slope_per_min"] == "degC/min"


async def test_a_devices_slow_tags_go_out_in_one_message_per_window_with_each_tags_provenance(
    memory_url, prefix
):
    """Tags in separate raw messages (each its own seq) still close into one features
    message per window end, with every tag's features and each tag's own counts."""
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    tags = ("bearing_temp", "oil_temp", "motor_current")
    t0 = 1_700_000_000_000
    async with (
        running(
            Featurizer,
            memory_url,
            prefix,
            plant=[(device, "press")],
            slow={"window_s": 1, "hop_s": 1, "stagger": False},
        ),
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as pub,
    ):
        seq = 0
        for i in range(35):  # 3.5 s, every tag every 100 ms, one raw message per tag
            for k, tag in enumerate(tags):
                good = not (tag == "oil_temp" and i in (12, 13))  # two bad samples
                metric = Metric(
                    name=tag,
                    value=20.0 + k + i * 0.01,
                    quality="good" if good else "bad",
                )
                data = DeviceData(ts=t0 + i * 100, node="adapter", seq=seq, metrics=[metric])
                seq = (seq + 1) % 256
                await pub.publish(f"{device}/raw/data", encode(data), qos=1)
        await w.wait_for(lambda _: sum(1 for _ in w.seen) >= 3)  # windows ending at 1, 2, 3 s
    from uns import decode

    messages: list[DeviceData] = [decode(m.payload) for m in w.seen]
    assert [m.window.end for m in messages] == [t0 + 1000, t0 + 2000, t0 + 3000]
    for m in messages:
        assert m.data_ts == m.window.end  # the data time, found first
        assert {x.name.rsplit(".", 1)[0] for x in m.metrics} == set(tags)
        assert set(m.signals) == set(tags)
        assert m.window.good == sum(s.good for s in m.signals.values())
        assert m.window.total == sum(s.total for s in m.signals.values())
    second = messages[1].signals  # 1.0 s to 2.0 s: oil_temp's two bad samples are in it
    assert (second["oil_temp"].good, second["oil_temp"].total) == (8, 10)
    assert (second["bearing_temp"].good, second["bearing_temp"].total) == (10, 10)
    # each tag's own source messages: raw message 3 * i + k carried tag k at sample i
    assert (second["motor_current"].seq_first, second["motor_current"].seq_last) == (32, 59)
    assert (messages[1].window.seq_first, messages[1].window.seq_last) == (30, 59)


def test_a_slow_hop_below_a_millisecond_is_refused_naming_the_field(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "plant.yaml"
    config.write_text("services:\n  featurizer:\n    slow: {hop_s: 0.0001}\n")
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "featurizer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "services.featurizer.slow.hop_s" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_device_with_more_slow_tags_than_a_message_holds_gets_several_per_window(
    memory_url, prefix, monkeypatch
):
    import uns_featurizer.service as featurizer_service

    monkeypatch.setattr(featurizer_service, "TAGS_PER_MESSAGE", 2)  # 1,000 in service
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    tags = ("a", "b", "c")
    t0 = 1_700_000_000_000
    async with (
        running(
            Featurizer,
            memory_url,
            prefix,
            plant=[(device, "press")],
            slow={"window_s": 1, "hop_s": 1, "stagger": False},
        ),
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as pub,
    ):
        for i in range(15):
            metrics = [Metric(name=t, value=float(i + k)) for k, t in enumerate(tags)]
            data = DeviceData(ts=t0 + i * 100, node="adapter", seq=i, metrics=metrics)
            await pub.publish(f"{device}/raw/data", encode(data), qos=1)
        await w.wait_for(lambda _: len(w.seen) >= 2)
    from uns import decode

    first = [decode(m.payload) for m in w.seen]
    assert [m.window.end for m in first] == [t0 + 1000, t0 + 1000]
    assert [len(m.signals) for m in first] == [2, 1]
    assert set(first[0].signals) | set(first[1].signals) == set(tags)
