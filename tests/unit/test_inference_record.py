"""Recordings (`uns record` files) and turning features messages into model rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uns import DeviceBirth, DeviceData, Metric, MetricDef, Window, encode
from uns_inference import record
from uns_inference.combine import DeviceFeatures, NotReady, Row

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


def test_a_row_waits_for_every_feature_and_combines_separate_messages() -> None:
    latest = DeviceFeatures()
    names = ["bearing_temp.mean", "vibration.rms"]
    latest.update(data(T0, vibration__rms=0.1).metrics, T0)
    assert latest.row(names, T0, 120_000) == NotReady(missing=["bearing_temp.mean"], stale=[])
    latest.update(data(T0 + 5000, bearing_temp__mean=45.0).metrics, T0 + 5000)
    row = latest.row(names, T0 + 5000, 120_000)
    assert isinstance(row, Row) and list(row.values) == [45.0, 0.1]


def test_a_feature_older_than_the_age_limit_is_stale_until_refreshed() -> None:
    latest = DeviceFeatures()
    names = ["bearing_temp.mean", "vibration.rms"]
    latest.update(data(T0, bearing_temp__mean=45.0).metrics, T0)
    latest.update(data(T0 + 200_000, vibration__rms=0.1).metrics, T0 + 200_000)
    assert latest.row(names, T0 + 200_000, 120_000) == NotReady(
        missing=[], stale=["bearing_temp.mean"]
    )
    latest.update(data(T0 + 201_000, bearing_temp__mean=46.0).metrics, T0 + 201_000)
    assert isinstance(latest.row(names, T0 + 201_000, 120_000), Row)


def test_bad_and_non_finite_values_are_not_taken() -> None:
    latest = DeviceFeatures()
    metrics = [
        Metric(name="a", value=1.0, quality="bad", reason="stale"),
        Metric(name="b", value=float("nan")),
        Metric(name="c", value=True),
        Metric(name="d", value=2.0, quality="uncertain"),
    ]
    assert latest.update(metrics, T0) == {"d"}
    row = latest.row(["d"], T0, 1000)
    assert isinstance(row, Row) and row.uncertain


def test_a_recording_becomes_the_rows_the_service_would_score(tmp_path: Path) -> None:
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
        if i % 10 == 5:
            chunks.append(line(f"{DEV}/features/data", data(ts, t__mean=40.0 + i)))
        chunks.append(line(f"{DEV}/raw/data", data(ts, x=1.0)))  # other streams are ignored
    path.write_bytes(b"".join(chunks))
    log = record.read_features([path])
    assert log.devices == [DEV] and log.announced[DEV] == {"vibration.rms", "t.mean"}
    ds = record.matrix(log, ["t.mean", "vibration.rms"])
    # a row from the first moment both are known (the slow window at t=5), then one per
    # waveform window (t=6..29) and per later slow window (t=15, 25)
    assert ds.x.shape == (1 + 24 + 2, 2)
    assert ds.ts[0] == T0 + 5000 and list(ds.x[0]) == [45.0, 5.1]
    assert set(ds.device) == {DEV}


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
