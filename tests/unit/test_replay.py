"""Replaying recorded files: the file's timestamps, every row, waveform blocks, real data."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from uns import DeviceData, DevicePath, Node, Waveform, decode
from uns.config import Namespace, UnsConfig
from uns.errors import ConfigError
from uns.testing import watching
from uns_replay import ReplaySettings, read_csv, read_npz, replay
from uns_replay.frames import parse_time


def test_timestamps_in_iso_8601_and_epoch_seconds_and_milliseconds():
    assert parse_time("2013-12-02 21:15:00") == 1386018900000
    assert parse_time("2013-12-02T21:15:00Z") == 1386018900000
    assert parse_time("1386018900") == 1386018900000
    assert parse_time("1386018900000") == 1386018900000


def test_a_csv_becomes_one_frame_per_row_with_its_own_timestamps(tmp_path):
    f = tmp_path / "historian.csv"
    f.write_text(
        "timestamp,Bearing Temp,pressure\n"
        "2024-01-01 00:00:00,55.1,210\n"
        "2024-01-01 00:00:05,55.3,oops\n"
        "2024-01-01 00:00:05,55.2,209.5\n"  # a duplicated timestamp, kept as recorded
        "2024-01-01 00:00:10,,\n"
    )
    rec = read_csv(f)
    assert [m.name for m in rec.metrics] == ["bearing_temp", "pressure"]
    frames = list(rec.frames)
    assert [ts for ts, _ in frames] == [1704067200000, 1704067205000, 1704067205000]
    assert [[m.value for m in ms] for _, ms in frames] == [[55.1, 210.0], [55.3], [55.2, 209.5]]
    assert rec.skipped == {"pressure": 2, "Bearing Temp": 1}


def test_a_csv_without_a_time_column_is_paced_by_the_interval(tmp_path):
    f = tmp_path / "values.csv"
    f.write_text("a\n1\n2\n3\n")
    frames = list(read_csv(f, interval_s=0.5, start_ms=1000).frames)
    assert [ts for ts, _ in frames] == [1000, 1500, 2000]


def test_a_wrong_time_column_is_named(tmp_path):
    f = tmp_path / "values.csv"
    f.write_text("when,a\n1,2\n")
    with pytest.raises(ConfigError, match="'stamp' is not a column"):
        read_csv(f, time_column="stamp")


def test_an_npz_becomes_waveform_blocks_back_to_back(tmp_path):
    f = tmp_path / "bearing.npz"
    np.savez(f, DE=np.arange(2500, dtype=np.float32), rpm=np.float64(1796))
    rec = read_npz(f, rate_hz=12_000, block=1000, start_ms=0)
    frames = list(rec.frames)
    assert len(frames) == 2  # the partial last block is not sent
    first = frames[0][1]
    wave = first[0].value
    assert isinstance(wave, Waveform) and wave.values()[:3] == [0.0, 1.0, 2.0]
    assert (first[1].name, first[1].value) == ("rpm", 1796.0)
    second = frames[1][1][0].value
    assert second.block == 1 and second.t0_us == pytest.approx(1000 / 12_000 * 1e6, abs=1)
    assert second.values()[0] == 1000.0


def test_an_npz_without_a_rate_asks_for_one(tmp_path):
    f = tmp_path / "x.npz"
    np.savez(f, DE=np.zeros(10, dtype=np.float32))
    with pytest.raises(ConfigError, match="--rate"):
        read_npz(f, rate_hz=None)


async def published(memory_url: str, prefix: str, rec, expected: int) -> list[DeviceData]:
    device = DevicePath(prefix, "pune", "replay", "line", "cell", "dev")
    node = Node(
        "replay",
        ReplaySettings(speed=0, metrics_port=0),
        UnsConfig(namespace=Namespace(enterprise=prefix)),
        broker_url=memory_url,
    )
    async with watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w:
        sent = await asyncio.wait_for(replay(node, device, rec, asyncio.Event()), 120)
        got = [
            decode(m.payload) for m in [await w.wait_for(lambda m: True) for _ in range(expected)]
        ]
    assert sent == expected
    return got


async def test_replay_publishes_every_row_in_order(memory_url, prefix, tmp_path):
    f = tmp_path / "values.csv"
    f.write_text("ts,a\n" + "".join(f"{1000 + i},{i}\n" for i in range(500)))
    got = await published(memory_url, prefix, read_csv(f), 500)
    assert [d.metrics[0].value for d in got] == list(range(500))
    assert [d.ts for d in got] == [(1000 + i) * 1000 for i in range(500)]


async def test_the_nab_machine_temperature_file_replays_whole(memory_url, prefix, datasets):
    f = datasets / "nab/data/realKnownCause/machine_temperature_system_failure.csv"
    got = await published(memory_url, prefix, read_csv(f), 22_695)
    assert got[0].ts == parse_time("2013-12-02 21:15:00")
    assert got[-1].ts == parse_time("2014-02-19 15:25:00")


async def test_a_cwru_fault_file_replays_as_12khz_blocks(memory_url, prefix, datasets):
    f = datasets / "cwru/12k_Drive_End_OR007at6_0_130.npz"
    rec = read_npz(f, rate_hz=12_000, block=1200)
    n = len(np.load(f)["DE"]) // 1200
    got = await published(memory_url, prefix, rec, n)
    de = [d.metrics[0].value for d in got]
    assert [w.block for w in de] == list(range(n))
    assert np.allclose(
        np.concatenate([np.frombuffer(w.samples, "<f4") for w in de]), np.load(f)["DE"][: n * 1200]
    )
