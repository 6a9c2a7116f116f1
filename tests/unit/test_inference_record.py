"""Recordings (`uns record` files) and turning features messages into model rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uns import DeviceBirth, DeviceData, Metric, MetricDef, Window, encode
from uns_inference import record
from uns_inference.combine import DeviceFeatures, GivenUp, NotReady, Row

DEV = "acme/pune/stamping/line-3/cell-a/press-01"
T0 = 1_795_334_400_000


def data(ts: int, **values: float) -> DeviceData:
    return DeviceData(
        ts=ts,
        node="featurizer",
        seq=0,
        metrics=[Metric(name=k.replace("__", "."), value=v) for k, v in values.items()],
        window=Window(start=ts - 1000, end=ts, good=10_000, total=10_000),
    )


def line(topic: str, payload: DeviceData | DeviceBirth, ts: int = T0) -> bytes:
    return record.encode_line(topic, ts, False, encode(payload))


def test_a_recorded_line_reads_back_as_the_message(tmp_path: Path) -> None:
    msg = data(T0, vibration__rms=0.12)
    path = tmp_path / "r.jsonl"
    path.write_bytes(
        line(f"{DEV}/features/data", msg)
        + record.encode_line(f"{DEV}/features/data", T0, False, b"not json")
        + b'{"topic": "x", "payload": {"type": "dd'  # truncated by a kill
    )
    stats = record.ReadStats()
    messages = list(record.read_messages(path, stats))
    assert [m.payload for m in messages] == [msg]
    assert messages[0].ts == T0 and messages[0].topic == f"{DEV}/features/data"
    assert stats.lines == 3 and stats.skipped == 2


def test_uns_sub_json_output_is_a_recording_too(tmp_path: Path) -> None:
    msg = data(T0, vibration__rms=0.12)
    path = tmp_path / "sub.jsonl"
    doc = {"topic": f"{DEV}/features/data", "retained": False, "payload": json.loads(encode(msg))}
    path.write_text(json.dumps(doc) + "\n")
    assert [m.payload for m in record.read_messages(path)] == [msg]


def test_a_row_waits_for_every_feature_of_its_window_and_combines_separate_messages() -> None:
    latest = DeviceFeatures()
    names = ["bearing_temp.mean", "vibration.rms"]
    latest.update(data(T0, vibration__rms=0.1).metrics, T0)
    assert latest.offer("m", names, T0) == NotReady(missing=["bearing_temp.mean"])
    latest.update(data(T0, bearing_temp__mean=45.0).metrics, T0)  # same window end
    row = latest.offer("m", names, T0)
    assert isinstance(row, Row) and list(row.values) == [45.0, 0.1]
    assert latest.offer("m", names, T0) is None  # scored once


def test_features_of_different_windows_never_make_a_row() -> None:
    latest = DeviceFeatures()
    names = ["bearing_temp.mean", "vibration.rms"]
    latest.update(data(T0, bearing_temp__mean=45.0).metrics, T0)
    latest.update(data(T0 + 1000, vibration__rms=0.1).metrics, T0 + 1000)
    assert latest.offer("m", names, T0 + 1000) == NotReady(missing=["bearing_temp.mean"])
    latest.update(data(T0 + 2000, bearing_temp__mean=46.0).metrics, T0 + 2000)
    assert latest.offer("m", names, T0 + 2000) == NotReady(missing=["vibration.rms"])


def test_an_incomplete_window_is_given_up_after_the_age_limit_naming_what_it_lacked() -> None:
    latest = DeviceFeatures()
    names = ["bearing_temp.mean", "vibration.rms"]
    models = {"m": names}
    latest.update(data(T0, vibration__rms=0.1).metrics, T0)
    latest.offer("m", names, T0)
    assert latest.expire(T0 + 5000, 120_000, models) == []
    gone = latest.expire(T0 + 200_000, 120_000, models)
    assert gone == [("m", GivenUp(T0, ["bearing_temp.mean"]))]
    assert latest.windows == {}


def test_a_window_older_than_the_last_scored_is_not_scored_after_it() -> None:
    latest = DeviceFeatures()
    names = ["vibration.rms"]
    latest.update(data(T0 + 1000, vibration__rms=0.2).metrics, T0 + 1000)
    assert isinstance(latest.offer("m", names, T0 + 1000), Row)
    latest.update(data(T0, vibration__rms=0.1).metrics, T0)  # arrives late
    assert latest.offer("m", names, T0) is None


def test_bad_and_non_finite_values_are_not_taken() -> None:
    latest = DeviceFeatures()
    metrics = [
        Metric(name="a", value=1.0, quality="bad", reason="stale"),
        Metric(name="b", value=float("nan")),
        Metric(name="c", value=True),
        Metric(name="d", value=2.0, quality="uncertain"),
    ]
    assert latest.update(metrics, T0) == {"d"}
    row = latest.row(["d"], T0)
    assert isinstance(row, Row) and row.uncertain
    assert latest.row(["a", "d"], T0) == NotReady(missing=["a"])


def test_a_recording_becomes_one_row_per_complete_window(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    birth = DeviceBirth(
        ts=T0,
        node="featurizer",
        device=DEV,
        bdseq=0,
        seq=0,
        metrics=[MetricDef(name=n, datatype="double") for n in ("vibration.rms", "t.mean")],
    )
    chunks = [line(f"{DEV}/features/birth", birth)]
    for i in range(30):
        ts = T0 + i * 1000
        chunks.append(line(f"{DEV}/features/data", data(ts, vibration__rms=0.1 + i)))
        if i % 10 == 5:  # a slow window ending with this waveform window
            chunks.append(line(f"{DEV}/features/data", data(ts, t__mean=40.0 + i)))
        chunks.append(line(f"{DEV}/raw/data", data(ts, x=1.0)))  # other streams are ignored
    path.write_bytes(b"".join(chunks))
    log = record.read_features([path])
    assert log.devices == [DEV] and log.announced[DEV] == {"vibration.rms", "t.mean"}
    ds = record.matrix(log, ["t.mean", "vibration.rms"])
    # only the windows with both (t=5, 15, 25): never t.mean of one window with the
    # vibration of another
    assert list(ds.ts) == [T0 + 5000, T0 + 15_000, T0 + 25_000]
    assert [list(r) for r in ds.x] == [[45.0, 5.1], [55.0, 15.1], [65.0, 25.1]]
    assert set(ds.device) == {DEV}
    assert len(record.matrix(log, ["vibration.rms"]).ts) == 30  # one row per window


def test_features_whose_windows_never_end_together_are_refused_for_training(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.jsonl"
    chunks = []
    for i in range(30):
        ts = T0 + i * 1000
        chunks.append(line(f"{DEV}/features/data", data(ts, vibration__rms=0.1)))
        if i % 10 == 5:
            chunks.append(line(f"{DEV}/features/data", data(ts + 300, t__mean=40.0)))
    path.write_bytes(b"".join(chunks))
    with pytest.raises(record.RecordingError, match="never end together"):
        record.matrix(record.read_features([path]), ["t.mean", "vibration.rms"], max_age_s=5)


def test_feature_choice_keeps_what_every_device_has_and_leaves_counters_out() -> None:
    log = record.FeatureLog(
        seen={
            "a/b/c/d/e/f": {"vibration.rms", "stroke_count.mean", "stroke_count.slope_per_min"},
            "a/b/c/d/e/g": {
                "vibration.rms",
                "stroke_count.mean",
                "stroke_count.slope_per_min",
                "x.mean",
            },
        }
    )
    assert record.choose_features(log) == ["stroke_count.slope_per_min", "vibration.rms"]
    assert record.choose_features(log, include=["vibration.*"]) == ["vibration.rms"]
    with pytest.raises(record.RecordingError, match="no feature"):
        record.choose_features(log, include=["nothing.*"])


def test_an_empty_recording_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(record.RecordingError, match="no features/data"):
        record.choose_features(record.read_features([path]))
