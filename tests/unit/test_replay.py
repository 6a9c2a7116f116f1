"""Replaying recorded files: the file's timestamps, every row, waveform blocks, real data."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from typer.testing import CliRunner

from uns import DeviceBirth, DeviceData, DeviceDeath, DevicePath, Node, Waveform, decode
from uns.cli import app
from uns.config import Namespace, UnsConfig
from uns.errors import ConfigError
from uns.testing import watching
from uns_replay import END_OF_REPLAY, ReplaySettings, read_csv, read_npz, replay
from uns_replay.frames import labels_among, parse_time


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


SEMICOLONS = (
    "time;sensor 1;sensor 2;label\n"
    "2024-01-01 00:00:00;1.5;10;0\n"
    "2024-01-01 00:00:01;1.6;11;0\n"
    "2024-01-01 00:00:02;9.9;12;1\n"
)


@pytest.mark.parametrize("sep", [";", "\t", "|", ","])
def test_the_delimiter_is_sniffed_so_a_semicolon_file_reads_by_its_time_column(tmp_path, sep):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS.replace(";", sep))
    rec = read_csv(f, time_column="time")
    assert rec.delimiter == sep
    assert [m.name for m in rec.metrics] == ["sensor_1", "sensor_2", "label"]
    frames = list(rec.frames)
    assert [ts for ts, _ in frames] == [1704067200000, 1704067201000, 1704067202000]
    assert [m.value for m in frames[2][1]] == [9.9, 12.0, 1.0]


def test_a_single_column_file_is_read_as_comma_separated(tmp_path):
    f = tmp_path / "values.csv"
    f.write_text("a\n1\n2\n")
    rec = read_csv(f, start_ms=0)
    assert rec.delimiter == "," and [[m.value for m in ms] for _, ms in rec.frames] == [[1], [2]]


def test_label_columns_are_ignored_and_columns_choose_by_header_or_metric_name(tmp_path):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    ignored = read_csv(f, ignore=["label"])
    assert [m.name for m in ignored.metrics] == ["sensor_1", "sensor_2"]
    assert all(m.name != "label" for _, ms in ignored.frames for m in ms)
    only = read_csv(f, columns=["sensor_2", "sensor 1", "label"], ignore=["label"])
    assert [m.name for m in only.metrics] == ["sensor_1", "sensor_2"]  # in the file's order


def test_a_semicolon_export_with_decimal_commas_reads_its_numbers(tmp_path):
    f = tmp_path / "export.csv"
    f.write_text("time;temp;flow\n2024-01-01 00:00:00;21,5;1.234,5\n2024-01-01 00:00:01;21,75;3\n")
    rec = read_csv(f)
    assert [[m.value for m in ms] for _, ms in rec.frames] == [[21.5], [21.75, 3.0]]
    assert rec.skipped == {"flow": 1}  # 1.234,5: a thousands point or a decimal one?


def test_a_column_named_like_a_label_is_pointed_out_unless_ignored(tmp_path):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    assert labels_among(read_csv(f)) == ["label"]
    assert labels_among(read_csv(f, ignore=["label"])) == []


@pytest.mark.parametrize("option", ["columns", "ignore"])
def test_an_unknown_column_is_named_with_the_files_columns(tmp_path, option):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    with pytest.raises(ConfigError, match=rf"--{option}: 'lable' is not a column .*label"):
        read_csv(f, **{option: ["lable"]})


def test_an_npz_publishes_only_the_arrays_chosen(tmp_path):
    f = tmp_path / "bearing.npz"
    np.savez(f, DE=np.zeros(2000, np.float32), FE=np.zeros(2000, np.float32), rpm=np.float64(1))
    rec = read_npz(f, rate_hz=12_000, ignore=["FE"])
    assert [m.name for m in rec.metrics] == ["de", "rpm"]
    assert [m.name for m in read_npz(f, rate_hz=12_000, columns=["FE"]).metrics] == ["fe"]


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


def device_of(prefix: str) -> DevicePath:
    return DevicePath(prefix, "pune", "replay", "line", "cell", "dev")


async def published(memory_url: str, prefix: str, rec, expected: int) -> list[DeviceData]:
    device = device_of(prefix)
    node = Node(
        "replay",
        ReplaySettings(speed=0, metrics_port=0),
        UnsConfig(namespace=Namespace(enterprise=prefix)),
        broker_url=memory_url,
    )
    async with watching(memory_url, f"{prefix}/+/+/+/+/+/raw/data") as w:
        done = await asyncio.wait_for(replay(node, device, rec, asyncio.Event()), 120)
        got = [
            decode(m.payload) for m in [await w.wait_for(lambda m: True) for _ in range(expected)]
        ]
    assert (done.sent, done.seen_back, done.finished) == (expected, expected, True)
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


async def test_a_semicolon_export_replays_without_its_label_column(memory_url, prefix, tmp_path):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    async with watching(memory_url, f"{prefix}/+/+/+/+/+/raw/birth") as births:
        got = await published(memory_url, prefix, read_csv(f, ignore=["label"]), 3)
        birth = await births.next(f"{prefix}/#", DeviceBirth)
    assert [m.name for m in birth.metrics] == ["sensor_1", "sensor_2"]
    assert [[(m.name, m.value) for m in d.metrics] for d in got] == [
        [("sensor_1", 1.5), ("sensor_2", 10.0)],
        [("sensor_1", 1.6), ("sensor_2", 11.0)],
        [("sensor_1", 9.9), ("sensor_2", 12.0)],
    ]


async def test_the_end_of_a_replay_is_the_devices_death_after_its_last_row(
    memory_url, prefix, tmp_path
):
    f = tmp_path / "values.csv"
    f.write_text("ts,a\n" + "".join(f"{1000 + i},{i}\n" for i in range(50)))
    async with watching(memory_url, f"{prefix}/+/+/+/+/+/raw/#") as w:
        await published(memory_url, prefix, read_csv(f), 50)
        await w.wait_topic(f"{device_of(prefix).topic('raw', 'death')}")
    kinds = [m.topic.rsplit("/", 1)[1] for m in w.messages]
    assert kinds == ["death", "birth", *["data"] * 50, "death"]  # (the first: clearing)
    death = decode(w.messages[-1].payload)
    assert isinstance(death, DeviceDeath)
    assert death.reason == f"{END_OF_REPLAY}: 50 rows, 50 seen back"
    # retained: a recorder that subscribes after the end still learns it is over
    async with watching(memory_url, f"{prefix}/+/+/+/+/+/raw/death") as late:
        retained = await late.next(f"{prefix}/#", DeviceDeath)
    assert retained.reason.startswith(END_OF_REPLAY)


def uns_replay_here(*args: str) -> tuple[int, list[str]]:
    """``uns replay ARGS`` in this process (it exits before connecting): code, stderr lines."""
    result = CliRunner().invoke(app, ["replay", *args, "--device", "acme/pune/a/b/c/dev"])
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.mark.parametrize("option", ["--columns", "--ignore"])
def test_uns_replay_exits_2_naming_an_unknown_column(tmp_path, option):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    code, err = uns_replay_here(str(f), "--time-column", "time", option, "sensor 1,lable")
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {option}: 'lable' is not a column")
    assert "sensor 1, sensor 2, label" in err[0]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty file, no header row"),
        ("timestamp;a;b\n", "nothing to replay: no data rows after the header"),
        ("timestamp,a\nyesterday,1\nlater,2\n", "nothing to replay: 2 rows, none with a"),
    ],
)
def test_uns_replay_of_a_file_with_nothing_to_replay_exits_2_in_one_line(tmp_path, text, says):
    f = tmp_path / "export.csv"
    f.write_text(text)
    code, err = uns_replay_here(str(f))
    assert code == 2
    assert len(err) == 1 and says in err[0], err


def test_uns_replay_names_a_delimiter_that_is_not_one_character(tmp_path):
    f = tmp_path / "export.csv"
    f.write_text(SEMICOLONS)
    code, err = uns_replay_here(str(f), "--delimiter", ";;")
    assert code == 2 and err == [
        "error: --delimiter: ';;' is not one character (e.g. ';', ',', '|' or tab)"
    ]
