"""`uns eval` as a reliability engineer runs it: a recording of the inference's scores and
events, labels as windows (NAB's JSON) or a CSV column, the figures printed and in JSON,
and a bad input that exits 2 naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from uns import DeviceData, Event, Metric, Window
from uns.cli import app

DEV = "acme/pune/stamping/line-3/cell-a/press-01"
T0 = 1_795_334_400_000  # 2026-11-22T08:00:00Z
MIN = 60_000


def iso(minute: int) -> str:
    return f"2026-11-22T{8 + minute // 60:02d}:{minute % 60:02d}:00Z"


def line(topic: str, payload: msgspec.Struct) -> bytes:
    return msgspec.json.encode({"topic": topic, "ts": 0, "retained": False, "payload": payload})


def scores(minute: int, score: float, threshold: float = 2.0, device: str = DEV) -> bytes:
    end = T0 + minute * MIN
    data = DeviceData(
        ts=end + 7,  # processing time: later than the window it scored
        node="inference",
        seq=minute % 256,
        window=Window(start=end - MIN, end=end, good=60, total=60),
        metrics=[
            Metric(name="anomaly_score", value=score),
            Metric(name="anomaly_threshold", value=threshold),
        ],
    )
    return line(f"{device}/scores/data", data)


def event(minute: int, started: int, state: str = "raised", *, data_ts: bool = False) -> bytes:
    e = Event(
        ts=T0 + minute * MIN + 9,
        data_ts=T0 + minute * MIN if data_ts else None,
        id=f"press-01-anomaly-{started}",
        kind="anomaly",
        state=state,  # type: ignore[arg-type]
        device=DEV,
        started=T0 + started * MIN,
    )
    return line(f"{DEV}/events/anomaly", e)


FLAGGED = set(range(45, 61)) | {79, 80, 81}


def recording(path: Path, *, events: bool = True) -> Path:
    """100 one-minute windows; a fault at minutes 45-60 (raised at 47), a false stretch at
    79-81 (raised at 81, its data time in the event, cleared at 85), nothing in a second
    labelled window (90-95)."""
    lines = []
    for m in range(1, 101):
        lines.append(scores(m, 3.0 if m in FLAGGED else 1.0))
        if events and m == 47:
            lines.append(event(47, 45))
        if events and m == 80:  # an event that says its data time (written before it)
            lines.append(event(81, 79, data_ts=True))
        if events and m == 85:
            lines.append(event(85, 79, "cleared"))
    lines.insert(10, b'{"topic": "not json')  # a torn line is skipped
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def uns(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_the_figures_of_a_recording_against_labelled_windows(tmp_path: Path) -> None:
    rec = recording(tmp_path / "rec.jsonl")
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps([[iso(40), iso(60)], [iso(90), iso(95)]]))
    out = tmp_path / "figures.json"
    code, stdout, stderr = uns(rec, "--labels", labels, "--json", out)
    assert code == 0, stderr
    # 25 labelled windows (ending 41-60 and 91-95: each holds labelled data), 19 flagged:
    # 16 inside, 3 outside
    assert stdout.splitlines()[:4] == [
        "points: 100 scored windows on 1 device(s), 25 labelled, 19 flagged",
        "point-wise: precision 0.842  recall 0.640  F1 0.727",
        "false-alarm rate 4.0% (normal windows flagged)  missed-alarm rate 36.0% (labelled"
        " windows not flagged)",
        "events (events): 2; labelled windows caught 1 of 2; median detection delay 7.0 min;"
        " false events 1 (14.55 per day over 0.1 device-days)",
    ]
    assert (
        f"  window {iso(40)} .. {iso(60)} ({DEV}): caught at {iso(47)} (7.0 min in), 1 event(s)"
        in stdout
    )
    assert f"  window {iso(90)} .. {iso(95)} ({DEV}): MISSED" in stdout
    assert f"  false event at {iso(81)} ({DEV})" in stdout
    figures = json.loads(out.read_text())
    assert figures["point"] | {"precision": 0, "recall": 0, "f1": 0} == {
        "points": 100,
        "labelled": 25,
        "flagged": 19,
        "tp": 16,
        "fp": 3,
        "fn": 9,
        "tn": 72,
        "precision": 0,
        "recall": 0,
        "f1": 0,
        "false_alarm_rate": 3 / 75,
        "missed_alarm_rate": 9 / 25,
    }
    assert figures["point"]["precision"] == pytest.approx(16 / 19)
    assert figures["point"]["recall"] == pytest.approx(16 / 25)
    assert figures["event"]["caught"] == 1
    assert figures["event"]["median_delay_s"] == 420.0
    assert figures["event"]["false_events"] == 1
    assert figures["event"]["false_per_day"] == pytest.approx(1440 / 99)
    assert figures["windows"][0]["first_event"] == iso(47)


def test_nab_style_keyed_windows_need_the_key_unless_a_key_names_the_device(
    tmp_path: Path,
) -> None:
    rec = recording(tmp_path / "rec.jsonl")
    nab = tmp_path / "combined_windows.json"
    nab.write_text(
        json.dumps(
            {
                "realKnownCause/machine.csv": [
                    ["2026-11-22 08:40:00.000000", "2026-11-22 09:00:00.000000"]
                ],
                "realKnownCause/other.csv": [],
            }
        )
    )
    code, _, stderr = uns(rec, "--labels", nab)
    assert code == 2
    assert "--labels: no key names a recorded device" in stderr
    assert "give --labels-key KEY" in stderr
    code, stdout, stderr = uns(rec, "--labels", nab, "--labels-key", "realKnownCause/machine.csv")
    assert code == 0, stderr
    assert "labelled windows caught 1 of 1" in stdout
    by_device = tmp_path / "by-device.json"
    by_device.write_text(json.dumps({"acme/pune/stamping/*": [[iso(40), iso(60)]]}))
    code, stdout, _ = uns(rec, "--labels", by_device)
    assert "labelled windows caught 1 of 1" in stdout
    code, _, stderr = uns(rec, "--labels", nab, "--labels-key", "nope.csv")
    assert code == 2
    assert "--labels-key: 'nope.csv' is not a key of" in stderr


def test_a_csv_label_column_and_a_recording_of_scores_alone(tmp_path: Path) -> None:
    """The replayed file's own label column; without events, each run of flagged windows
    is one event at its first window."""
    rec = recording(tmp_path / "rec.jsonl", events=False)
    csv = tmp_path / "export.csv"
    rows = [
        f"{iso(m).replace('T', ' ').rstrip('Z')};{20 + m};{int(40 <= m <= 60)}" for m in range(101)
    ]
    csv.write_text("time;temp;fault\n" + "\n".join(rows) + "\n")
    code, stdout, stderr = uns(rec, "--labels", csv, "--label-column", "fault", "--from", iso(30))
    assert code == 0, stderr
    assert stdout.splitlines()[0] == (
        "points: 71 scored windows on 1 device(s), 21 labelled, 19 flagged"
    )
    assert (
        "events (flagged runs): 2; labelled windows caught 1 of 1; median detection delay"
        " 5.0 min; false events 1"
    ) in stdout


def test_rul_against_failure_times(tmp_path: Path) -> None:
    rec = tmp_path / "rul.jsonl"
    lines = []
    for h in range(1, 11):
        end = T0 + h * 3_600_000
        data = DeviceData(
            ts=end,
            node="inference",
            seq=h,
            window=Window(start=end - 3_600_000, end=end, good=1, total=1),
            metrics=[
                Metric(name="rul", value=min(100 - h + 2.0, 60.0)),
                Metric(name="rul_lower", value=0.0),
                Metric(name="rul_upper", value=200.0),
            ],
        )
        lines.append(line(f"{DEV}/scores/data", data))
    rec.write_bytes(b"\n".join(lines) + b"\n")
    failures = tmp_path / "failures.json"
    failures.write_text(json.dumps({DEV: T0 + 100 * 3_600_000}))
    out = tmp_path / "rul.json"
    code, stdout, stderr = uns(rec, "--failures", failures, "--rul-cap", "60", "--json", out)
    assert code == 0, stderr
    assert "RUL at last point (1 points, h, true RUL capped at 60): RMSE 0.00" in stdout
    last = json.loads(out.read_text())["rul"]["at_last_point"]
    assert last["rmse"] == 0.0
    assert last["interval_coverage"] == 1.0
    code, stdout, _ = uns(rec, "--failures", failures)
    assert "RUL every point (10 points, h): RMSE 34.62" in stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--labels", "{missing}"], "--labels: "),
        (["--labels", "{bad_json}"], "is not JSON"),
        (["--labels", "{bad_window}"], "--labels[1]: 'yesterday' is neither ISO 8601"),
        (["--labels", "{backwards}"], "--labels[0]: ends before it starts"),
        (["--labels", "{csv}"], "--labels: "),
        (["--labels", "{csv}", "--label-column", "nope"], "--label-column: 'nope' is not a column"),
        (
            ["--labels", "{csv}", "--label-column", "fault", "--time-column", "t"],
            "--time-column: 't'",
        ),
        (
            ["--labels", "{bad_csv}", "--label-column", "fault"],
            "--label-column 'fault', line 3: 'maybe'",
        ),
        (["--label-column", "fault"], "--label-column: give --labels"),
        (["--from", "soon"], "--from: 'soon' is neither ISO 8601"),
        (["--from", "2026-11-22T10:00:00Z", "--to", "2026-11-22T09:00:00Z"], "--to: "),
        (["--from", "2030-01-01"], "RECORDING: no anomaly score"),
        (["--device", "other/*"], "RECORDING: "),
        (["--rul-unit", "weeks"], "--rul-unit: 'weeks'"),
        (["--failures", "{bad_window}"], "--failures: "),
    ],
)
def test_a_bad_input_exits_2_naming_the_option(tmp_path: Path, args: list[str], names: str) -> None:
    rec = recording(tmp_path / "rec.jsonl")
    files = {
        "missing": tmp_path / "missing.json",
        "bad_json": tmp_path / "bad.json",
        "bad_window": tmp_path / "bad_window.json",
        "backwards": tmp_path / "backwards.json",
        "csv": tmp_path / "labels.csv",
        "bad_csv": tmp_path / "bad.csv",
    }
    files["bad_json"].write_text("[[1, 2]")
    files["bad_window"].write_text(json.dumps([[iso(1), iso(2)], ["yesterday", iso(3)]]))
    files["backwards"].write_text(json.dumps([[iso(5), iso(2)]]))
    files["csv"].write_text("time,fault\n2026-11-22 08:00:00,0\n")
    files["bad_csv"].write_text("time,fault\n2026-11-22 08:00:00,0\n2026-11-22 08:01:00,maybe\n")
    code, _, stderr = uns(rec, *(a.format(**files) for a in args))
    assert code == 2
    assert names in stderr
    assert "Traceback" not in stderr


def test_a_recording_without_scores_says_what_to_record(tmp_path: Path) -> None:
    rec = tmp_path / "features.jsonl"
    rec.write_bytes(scores(1, 1.0, device=DEV).replace(b"/scores/", b"/features/") + b"\n")
    code, _, stderr = uns(rec)
    assert code == 2
    assert f"RECORDING: {rec} holds no scores or events (1 lines)" in stderr
    code, _, stderr = uns(tmp_path / "nothing.jsonl")
    assert code == 2
    assert "RECORDING: " in stderr and "No such file" in stderr
