"""`uns model train` as a reliability engineer drives it: a time range, feature globs, the
threshold's options, the false-alarm rates it prints, and a warning when a spike is there."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from uns import DeviceBirth, DeviceData, Metric, MetricDef, Window, encode
from uns.cli import app
from uns_inference import TRAINING, record
from uns_inference.cli import data_time_ms

DEV = "acme/pune/stamping/line-3/cell-a/press-01"
T0 = 1_795_334_400_000  # 2026-11-22T08:00:00Z
SENSORS = [f"line.s{j}.mean" for j in range(6)]
OTHER = ["line.s0.std"]


def plant(n: int, seed: int = 3) -> np.ndarray:
    """Six sensors moved by one slowly varying load (one row a second), and a seventh."""
    rng = np.random.default_rng(seed)
    load = np.convolve(rng.normal(size=n + 19), np.ones(20) / 20**0.5, "valid")
    cols = [10 + (1 + 0.3 * j) * load + 0.5 * rng.normal(size=n) for j in range(6)]
    return np.column_stack([*cols, 1 + 0.1 * rng.normal(size=n)])


def write_recording(path: Path, x: np.ndarray) -> None:
    names = SENSORS + OTHER
    birth = DeviceBirth(
        ts=T0,
        node="featurizer",
        device=DEV,
        bdseq=0,
        seq=0,
        metrics=[MetricDef(name=n, datatype="double") for n in names],
    )
    out = [record.encode_line(f"{DEV}/features/birth", T0, True, encode(birth))]
    for i, row in enumerate(x):
        ts = T0 + i * 1000
        msg = DeviceData(
            ts=ts,
            node="featurizer",
            seq=i % 256,
            metrics=[Metric(name=n, value=float(v)) for n, v in zip(names, row, strict=True)],
            window=Window(start=ts - 1000, end=ts, good=1, total=1),
        )
        out.append(record.encode_line(f"{DEV}/features/data", ts, False, encode(msg)))
    path.write_bytes(b"".join(out))


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def train(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["model", "train", "--kind", "anomaly", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "plant.jsonl"
    write_recording(path, plant(900))
    return path


def test_the_options_choose_the_rows_features_and_threshold_and_the_card_says_so(
    tmp_path: Path, recording: Path
) -> None:
    out = tmp_path / "m"
    code, stdout, stderr = train(
        *("--data", str(recording), "--out", str(out), "--asset", "press"),
        *("--from", iso(T0 + 100_000), "--to", str(T0 + 700_000)),
        *("--features", "line.s*.mean", "--quantile", "0.99", "--margin", "1.5"),
        *("--variance", "0.9", "--folds", "6"),
    )
    assert code == 0, stderr
    card = json.loads((out / "card.json").read_text())
    assert card["features"] == SENSORS
    assert card["training"]["rows"] == 600  # data time in [T0 + 100 s, T0 + 700 s)
    parameters = card["training"]["parameters"]
    assert (parameters["quantile"], parameters["margin"]) == (0.99, 1.5)
    assert (parameters["variance"], parameters["folds"]) == (0.9, 6)
    assert parameters["from"] == "2026-11-22T08:01:40Z" and parameters["to"] == iso(T0 + 700_000)
    assert len(card["evaluation"]["raise_threshold_per_fold"]) == 6
    rates = card["evaluation"]
    assert (
        f"false alarms on the 600 training rows (score >= raise {card['thresholds']['raise']:g}):"
        f" in-sample {rates['breach_rate_in_sample']:.2%},"
        f" out-of-fold {rates['breach_rate_out_of_fold']:.2%}"
    ) in stdout
    assert "WARNING" not in stderr


def test_the_defaults_are_those_of_the_training_struct(tmp_path: Path, recording: Path) -> None:
    out = tmp_path / "m"
    code, _, stderr = train("--data", str(recording), "--out", str(out), "--asset", "press")
    assert code == 0, stderr
    parameters = json.loads((out / "card.json").read_text())["training"]["parameters"]
    for option in ("quantile", "margin", "variance", "folds", "family"):
        assert parameters[option] == getattr(TRAINING, option)
    assert "from" not in parameters and "to" not in parameters


def test_the_card_says_which_detector_auto_chose_and_why(tmp_path: Path, recording: Path) -> None:
    out = tmp_path / "m"
    code, _, stderr = train(
        *("--data", str(recording), "--out", str(out), "--asset", "press", "--family", "auto")
    )
    assert code == 0, stderr
    card = json.loads((out / "card.json").read_text())
    chosen = card["evaluation"]["family"]
    detection = card["evaluation"]["probe_detection_out_of_fold"]
    assert chosen == max(("pca", "t2"), key=lambda f: (detection[f], f == "pca"))
    assert card["training"]["parameters"]["family"] == "auto"
    assert f"it detects {detection[chosen]:.1%}" in card["method"]


def test_a_spike_in_the_training_data_is_named_with_its_data_time(tmp_path: Path) -> None:
    x = plant(400)
    x[150, 2] = x[:, 2].mean() + 30 * x[:, 2].std()
    path = tmp_path / "spiked.jsonl"
    write_recording(path, x)
    code, _, stderr = train("--data", str(path), "--out", str(tmp_path / "m"), "--asset", "press")
    assert code == 0, stderr
    warning = next(line for line in stderr.splitlines() if line.startswith("WARNING:"))
    assert "1 row(s) left out of the fit and the threshold" in warning
    assert f"{DEV} at {iso(T0 + 150_000)}" in warning


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--quantile", "1.5"), "--quantile"),
        (("--quantile", "0"), "--quantile"),
        (("--margin", "0"), "--margin"),
        (("--variance", "0.3"), "--variance"),
        (("--variance", "1"), "--variance"),
        (("--folds", "1"), "--folds"),
        (("--folds", "many"), "--folds"),
        (("--family", "deep"), "--family"),
        (("--from", "yesterday"), "--from"),
        (("--to", "2026-13-01"), "--to"),
        (("--from", "2026-11-22T01:00:00Z", "--to", "2026-11-22T00:00:00Z"), "--to"),
    ],
)
def test_a_bad_value_exits_2_naming_the_option(
    tmp_path: Path, recording: Path, args: tuple[str, ...], named: str
) -> None:
    code, _, stderr = train("--data", str(recording), "--out", str(tmp_path / "m"), *args)
    assert code == 2
    assert named in stderr
    assert not (tmp_path / "m").exists()


def test_a_range_without_rows_says_what_the_recording_holds(
    tmp_path: Path, recording: Path
) -> None:
    code, _, stderr = train(
        *("--data", str(recording), "--out", str(tmp_path / "m"), "--asset", "press"),
        *("--from", "2030-01-01"),
    )
    assert code == 1
    assert f"the recording holds {iso(T0)} to {iso(T0 + 899_000)}" in stderr


def test_data_time_is_iso_8601_or_epoch_ms() -> None:
    assert data_time_ms("2026-11-22T08:00:00Z", "--from") == T0
    assert data_time_ms("2026-11-22T13:30:00+05:30", "--from") == T0
    assert data_time_ms("2026-11-22 08:00", "--from") == T0  # UTC when it names no zone
    assert data_time_ms(str(T0), "--from") == T0
