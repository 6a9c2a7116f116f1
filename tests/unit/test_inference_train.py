"""Fitting and exporting models: false alarms, detection, ONNX = numpy, RUL, reproducibility."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from uns_inference import build, onnxmodel, train
from uns_inference.card import Card, Normalisation, Thresholds, Training
from uns_inference.onnxmodel import OnnxModel, Verified

NAMES = [
    "bearing_temp.mean",
    "vibration.band_10_1000",
    "vibration.crest",
    "vibration.env_bpfo",
    "vibration.kurtosis",
    "vibration.peak",
    "vibration.rms",
]


def healthy(n: int, seed: int) -> np.ndarray:
    """Correlated features of a healthy press: load moves RMS, peak, band energy, temperature."""
    rng = np.random.default_rng(seed)
    load = rng.normal(size=n)
    rms = 0.12 + 0.01 * load + 0.003 * rng.normal(size=n)
    peak = 3.2 * rms + 0.01 * rng.normal(size=n)
    return np.column_stack(
        [
            45 + 0.5 * load + 0.2 * rng.normal(size=n),
            np.exp(np.log(0.01) + 0.15 * load + 0.05 * rng.normal(size=n)),
            peak / rms,
            np.exp(np.log(0.002) + 0.3 * rng.normal(size=n)),
            3 + 0.1 * rng.normal(size=n),
            peak,
            rms,
        ]
    )


def bearing_fault(x: np.ndarray) -> np.ndarray:
    """Impacts: kurtosis and the envelope at BPFO up, a little more RMS."""
    y = x.copy()
    y[:, NAMES.index("vibration.kurtosis")] += 1.5
    y[:, NAMES.index("vibration.env_bpfo")] *= 6
    y[:, NAMES.index("vibration.rms")] *= 1.1
    return y


def session(graph: bytes, features: list[str], outputs: list[str]) -> OnnxModel:
    card = Card(
        name="t",
        version="1",
        kind="anomaly" if "score" in outputs else "rul",
        asset="press",
        method="test",
        features=features,
        outputs=outputs,
        normalisation=Normalisation(
            means=[0.0] * len(features),
            stds=[1.0] * len(features),
            log=[False] * len(features),
            offsets=[1.0] * len(features),
        ),
        thresholds=Thresholds(raise_=1, clear=0.5, min_raise_s=0, min_clear_s=0, critical=2),
        training=Training(rows=0, data_sha256="", created=""),
        sha256=hashlib.sha256(graph).hexdigest(),
    )
    return onnxmodel.OnnxModel(
        Verified(directory=None, card=card, model_bytes=graph, sha256=card.sha256, signed=False)
    )  # type: ignore[arg-type]


def test_a_model_of_healthy_data_rarely_alarms_on_new_healthy_data_and_flags_a_fault() -> None:
    model = train.fit_anomaly(healthy(3000, seed=1), NAMES)
    held_out = healthy(5000, seed=2)
    false_alarms = float((model.score(held_out) >= model.raise_threshold).mean())
    assert false_alarms <= 0.01
    detected = float((model.score(bearing_fault(held_out)) >= model.raise_threshold).mean())
    assert detected >= 0.95
    assert model.clear_threshold < model.raise_threshold
    assert model.evaluation["breach_rate_out_of_fold"] <= 0.01


def test_a_healthy_window_scores_about_one_and_contributions_add_up_to_the_score() -> None:
    x = healthy(2000, seed=3)
    model = train.fit_anomaly(x, NAMES)
    scores = model.score(healthy(2000, seed=4))
    assert 0.5 < float(np.median(scores)) < 1.5
    c = model.contributions(x[:50])
    assert (c >= 0).all()
    np.testing.assert_allclose(c.sum(axis=1), model.score(x[:50]), rtol=1e-12)


def test_the_feature_that_moved_has_the_largest_contribution() -> None:
    model = train.fit_anomaly(healthy(2000, seed=5), NAMES)
    x = healthy(200, seed=6)
    x[:, NAMES.index("vibration.kurtosis")] += 3
    top = np.argmax(model.contributions(x), axis=1)
    assert (top == NAMES.index("vibration.kurtosis")).mean() > 0.9


def test_energy_features_are_log_transformed_and_others_are_not() -> None:
    model = train.fit_anomaly(healthy(500, seed=7), NAMES)
    logged = {n for n, lg in zip(NAMES, model.transform.log, strict=True) if lg}
    assert logged == {"vibration.band_10_1000", "vibration.env_bpfo"}


def test_the_onnx_graph_computes_what_the_numpy_model_computes() -> None:
    model = train.fit_anomaly(healthy(2000, seed=8), NAMES)
    onnx = session(build.anomaly_onnx(model), NAMES, ["score", "contributions"])
    x = np.vstack([healthy(300, seed=9), bearing_fault(healthy(300, seed=10))]).astype(np.float32)
    out = onnx.run(x)
    ref_c = model.contributions(x.astype(np.float64))
    assert out["score"].shape == (600,) and out["contributions"].shape == (600, len(NAMES))
    assert np.abs(out["score"] - ref_c.sum(axis=1)).max() <= 1e-4 * max(1.0, ref_c.max())
    assert np.abs(out["contributions"] - ref_c).max() <= 1e-4 * max(1.0, ref_c.max())


def test_training_twice_on_the_same_data_gives_the_same_onnx_bytes() -> None:
    x = healthy(1000, seed=11)
    first = build.anomaly_onnx(train.fit_anomaly(x, NAMES))
    second = build.anomaly_onnx(train.fit_anomaly(x.copy(), NAMES))
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    other = build.anomaly_onnx(train.fit_anomaly(healthy(1000, seed=12), NAMES))
    assert other != first


def test_too_little_data_is_refused_with_a_reason() -> None:
    with pytest.raises(train.TrainingError, match="rows"):
        train.fit_anomaly(healthy(10, seed=13), NAMES)
    x = healthy(100, seed=14)
    x[3, 2] = np.nan
    with pytest.raises(train.TrainingError, match="NaN"):
        train.fit_anomaly(x, NAMES)


def test_constant_and_trending_features_are_spotted() -> None:
    x = healthy(200, seed=15)
    x[:, 0] = 7.0
    x[:, 1] = np.arange(200.0)
    assert train.constant_features(x, NAMES) == ["bearing_temp.mean"]
    assert train.trending_features(x, NAMES) == ["vibration.band_10_1000"]


SENSORS = [f"line.s{j}.mean" for j in range(6)]


def labelled_plant(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Six sensors at 1 Hz moved by one slowly varying load; the labelled fault, late in the
    series, is sensor 2 drifting 8 noise deviations off its correlation with the others."""
    rng = np.random.default_rng(seed)
    load = np.convolve(rng.normal(size=n + 19), np.ones(20) / 20**0.5, "valid")
    x = np.column_stack([10 + (1 + 0.3 * j) * load + 0.5 * rng.normal(size=n) for j in range(6)])
    fault = np.zeros(n, dtype=bool)
    fault[n - 200 : n - 100] = True
    x[fault, 2] += 4.0
    return x, fault


@pytest.mark.parametrize("seed", range(4))
def test_one_spike_in_the_training_stretch_neither_lifts_the_threshold_nor_hides_a_fault(
    seed: int,
) -> None:
    x, fault = labelled_plant(1000, seed)
    normal = x[:400]
    spiked = normal.copy()
    spiked[150, 2] = normal[:, 2].mean() + 30 * normal[:, 2].std()  # one row, |z| = 30
    clean = train.fit_anomaly(normal, SENSORS)
    model = train.fit_anomaly(spiked, SENSORS)
    assert 0.5 < model.raise_threshold / clean.raise_threshold < 2.0
    later, labels = x[400:], fault[400:]
    caught = model.score(later[labels]) >= model.raise_threshold
    assert caught.mean() >= 0.9
    assert (model.score(later[~labels]) >= model.raise_threshold).mean() <= 0.01
    assert model.calibration is not None
    assert model.calibration.excursions.tolist() == [150]
    assert model.calibration.untrimmed > 10 * model.raise_threshold
    assert model.evaluation["excursions_left_out"] == 1
    assert clean.calibration is not None and len(clean.calibration.excursions) == 0


def test_a_fold_unlike_the_others_is_kept_and_named_as_driving_the_threshold() -> None:
    x = labelled_plant(1000, seed=5)[0][:400]
    x[320:, 2] += 3.0  # the last fold runs another way: 80 rows, not an excursion
    model = train.fit_anomaly(x, SENSORS)
    cal = model.calibration
    assert cal is not None and len(cal.excursions) == 0
    assert cal.driving_fold == 4
    assert max(cal.per_fold) > 2 * float(np.median(cal.per_fold))
    assert len(model.evaluation["raise_threshold_per_fold"]) == 5


def test_the_t2_family_runs_in_onnx_as_in_numpy_and_auto_picks_the_one_detecting_more() -> None:
    x, fault = labelled_plant(1000, seed=0)
    t2 = train.fit_anomaly(x[:400], SENSORS, family="t2")
    assert t2.family == "t2" and t2.components == len(SENSORS)
    onnx = session(build.anomaly_onnx(t2), SENSORS, ["score", "contributions"])
    out = onnx.run(x.astype(np.float32))
    ref = t2.score(x.astype(np.float32).astype(np.float64))
    assert np.abs(out["score"] - ref).max() <= 1e-4 * max(1.0, ref.max())
    assert (t2.score(x[400:][fault[400:]]) >= t2.raise_threshold).mean() >= 0.9
    auto = train.fit_anomaly(x[:400], SENSORS, family="auto")
    detection = auto.evaluation["probe_detection_out_of_fold"]
    assert set(detection) == {"pca", "t2"}
    assert auto.family == ("t2" if detection["t2"] > detection["pca"] else "pca")
    assert auto.evaluation["family"] == auto.family
    with pytest.raises(train.TrainingError, match="family"):
        train.fit_anomaly(x[:400], SENSORS, family="deep")


# ---- remaining useful life -----------------------------------------------------------


def degradation_runs(runs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Run-to-failure histories: hourly rows, wear grows late in life (as bearings do)."""
    rng = np.random.default_rng(seed)
    names = ["vibration.rms", "vibration.kurtosis", "vibration.env_bpfo", "bearing_temp.mean"]
    xs, ts, run_ids = [], [], []
    for r in range(runs):
        life = int(rng.integers(250, 350))
        t = np.arange(life, dtype=float)
        remaining = life - 1 - t
        wear = np.exp(-np.minimum(remaining, 200.0) / 40.0)  # invisible for most of life
        xs.append(
            np.column_stack(
                [
                    0.12 + 0.3 * wear + 0.005 * rng.normal(size=life),
                    3 + 4 * wear + 0.1 * rng.normal(size=life),
                    0.002 * np.exp(3 * wear + 0.2 * rng.normal(size=life)),
                    45 + 10 * wear + 0.3 * rng.normal(size=life),
                ]
            )
        )
        ts.append(t * 3_600_000)
        run_ids.append(np.full(life, r))
    return np.vstack(xs), np.concatenate(ts), np.concatenate(run_ids).astype(np.intp), names


def test_rul_regression_tracks_the_remaining_life_near_the_end() -> None:
    x, ts, runs, names = degradation_runs(6, seed=20)
    y = train.rul_targets(ts, runs, unit_s=3600.0, cap=125.0)
    assert y.max() == 125.0 and y.min() == 0.0
    model = train.fit_rul(x, y, names, runs=runs, cap=125.0)
    assert model.evaluation["rmse_out_of_fold"] < 25.0
    test_x, test_ts, test_runs, _ = degradation_runs(2, seed=21)
    rul, lower, upper = model.predict(test_x)
    truth = train.rul_targets(test_ts, test_runs, 3600.0, 125.0)
    late = truth < 60
    assert np.sqrt(np.mean((rul[late] - truth[late]) ** 2)) < 20.0
    assert (lower <= rul).all() and (rul <= upper).all()
    assert rul.min() >= 0.0 and rul.max() <= 125.0
    inside = ((truth >= lower) & (truth <= upper)).mean()
    assert inside > 0.6


def test_the_rul_graph_computes_what_the_numpy_model_computes() -> None:
    x, ts, runs, names = degradation_runs(4, seed=22)
    model = train.fit_rul(x, train.rul_targets(ts, runs, 3600.0, 125.0), names, runs=runs)
    onnx = session(build.rul_onnx(model), names, ["rul", "rul_lower", "rul_upper"])
    out = onnx.run(x.astype(np.float32))
    for name, ref in zip(
        ("rul", "rul_lower", "rul_upper"), model.predict(x.astype(np.float32)), strict=True
    ):
        assert np.abs(out[name] - ref).max() <= 1e-4 * 125
