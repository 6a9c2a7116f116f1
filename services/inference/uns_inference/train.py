"""Fitting models on recorded features: numpy only, deterministic (no random numbers).

Anomaly (`fit_anomaly`): PCA on standardised features and a combined index of the
two classic PCA monitoring statistics,

    score = (T²/k + SPE/θ) / 2

T² (Hotelling, in the k retained components) sees a fault that moves features
*along* their usual correlations (vibration RMS, peak and band energies rising
together); SPE (the squared reconstruction error, Q) sees one that *breaks* them
(an envelope line at BPFO without a rise in RMS). Each is divided by its mean on
the training data (k, and θ = the discarded variance), so a healthy window scores
about 1. Both statistics are sums of squares of one linear map of the standardised
vector (T² through the symmetric square root P Λ^-½ Pᵀ, which keeps the feature
axes), so the score splits exactly into non-negative per-feature contributions.

RUL (`fit_rul`): ridge regression to a target clipped at a cap (C-MAPSS's
piecewise-linear protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uns_inference.options import TRAINING

Array = NDArray[np.float64]

ENERGY_FEATURES: Final = ("bpfo_band", "bpfi_band", "bsf_band", "env_bpfo", "env_bpfi", "env_bsf")
STD_FLOOR_ABS: Final = 1e-9
STD_FLOOR_REL: Final = 1e-3
LOG_OFFSET_REL: Final = 1e-3
LOG_OFFSET_MIN: Final = 1e-12


class TrainingError(ValueError):
    """The data cannot give a sound model (too few rows, no variance, ...)."""


def is_energy(name: str) -> bool:
    """Band energies and envelope amplitudes: positive, heavy-tailed, multiplicative."""
    stat = name.rsplit(".", 1)[-1]
    return stat.startswith("band_") or stat in ENERGY_FEATURES


@dataclass(frozen=True)
class Transform:
    """Per feature: optional log, then standardisation. Applied inside the ONNX graph too."""

    log: NDArray[np.bool_]
    offsets: Array
    means: Array
    stds: Array

    def apply(self, x: Array) -> Array:
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log(np.maximum(x, 0.0) + self.offsets)
        xt = np.where(self.log, logged, x)
        return (xt - self.means) / self.stds


def fit_transform(x: Array, names: Sequence[str]) -> Transform:
    """Log-transform energy features that are never negative; standardise everything.

    The log offset is a thousandth of the feature's median (a floor of 1e-12), so
    windows with no energy at all stay finite. Standard deviations are floored at
    max(1e-9, 1e-3 |mean|): a feature constant in training would otherwise make any
    later wiggle an infinite anomaly.
    """
    log = np.array([is_energy(n) and bool((x[:, j] >= 0).all()) for j, n in enumerate(names)])
    medians = np.median(x, axis=0)
    offsets = np.where(log, np.maximum(LOG_OFFSET_REL * np.abs(medians), LOG_OFFSET_MIN), 1.0)
    xt = np.where(log, np.log(np.maximum(x, 0.0) + offsets), x)
    means = xt.mean(axis=0)
    stds = xt.std(axis=0, ddof=1)
    stds = np.maximum(stds, np.maximum(STD_FLOOR_ABS, STD_FLOOR_REL * np.abs(means)))
    return Transform(log=log, offsets=offsets, means=means, stds=stds)


def contiguous_folds(n: int, k: int) -> list[NDArray[np.intp]]:
    """Row indices of k contiguous blocks: time-series folds (neighbours are alike)."""
    return [f for f in np.array_split(np.arange(n), k) if len(f)]


def constant_features(x: Array, names: Sequence[str]) -> list[str]:
    """Features that never change in the data: no information, only brittleness."""
    return [n for j, n in enumerate(names) if np.ptp(x[:, j]) == 0.0]


def trending_features(x: Array, names: Sequence[str], threshold: float = 0.95) -> list[str]:
    """Features almost perfectly correlated with time (counters, warm-up): a healthy
    model trained on them flags the future as anomalous."""
    t = np.arange(len(x), dtype=float)
    out = []
    for j, n in enumerate(names):
        col = x[:, j]
        if np.ptp(col) == 0.0:
            continue
        r = np.corrcoef(t, col)[0, 1]
        if abs(r) >= threshold:
            out.append(n)
    return out


# ---- anomaly -----------------------------------------------------------------------


@dataclass(frozen=True)
class AnomalyModel:
    features: list[str]
    transform: Transform
    t2_map: Array
    """F x F: sum((z @ t2_map)**2) = T²/k (times its weight)."""
    spe_map: Array
    """F x F: sum((z @ spe_map)**2) = SPE/θ (times its weight)."""
    components: int
    variance_kept: float
    raise_threshold: float
    clear_threshold: float
    critical_threshold: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    """How the raise threshold came about: per fold, and what was left out of it."""
    family: str = "pca"
    """`FAMILIES`: which detector the maps compute."""

    def contributions(self, x: Array) -> Array:
        """Per-feature shares of the score (non-negative, summing to it): float64 reference."""
        z = self.transform.apply(np.asarray(x, dtype=np.float64))
        a = z @ self.t2_map
        b = z @ self.spe_map
        return np.asarray(a * a + b * b)

    def score(self, x: Array) -> Array:
        return np.asarray(self.contributions(x).sum(axis=1))


@dataclass(frozen=True)
class _Pca:
    t2_map: Array
    spe_map: Array
    k: int
    kept: float


def _fit_pca(z: Array, variance: float) -> _Pca:
    n, f = z.shape
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = s**2 / max(n - 1, 1)
    total = float(lam.sum())
    if total <= 0.0:
        raise TrainingError("the features do not vary at all in the data")
    ratio = np.cumsum(lam) / total
    k = int(np.searchsorted(ratio, variance - 1e-12) + 1)
    k = min(k, f)
    p = vt[:k].T
    lam_k = np.maximum(lam[:k], 1e-12 * lam[0])
    theta = float(lam[k:].sum())
    has_spe = theta > 1e-9 * total
    weight = 2.0 if has_spe else 1.0
    t2_map = (p / np.sqrt(lam_k)) @ p.T / np.sqrt(weight * k)
    spe_map = (np.eye(f) - p @ p.T) / np.sqrt(weight * theta) if has_spe else np.zeros((f, f))
    return _Pca(t2_map=t2_map, spe_map=spe_map, k=k, kept=float(ratio[k - 1]))


T2_FLOOR_REL: Final = 1e-6
"""T² in every component: eigenvalues floored at this share of the largest, so a direction
the training data barely moves in (two features that are one) does not make any wiggle
along it an alarm."""


def _fit_t2(z: Array) -> _Pca:
    """Hotelling's T² in every component (the Mahalanobis distance), divided by the
    number of features so a healthy row scores about 1: no residual part."""
    n, f = z.shape
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = s**2 / max(n - 1, 1)
    if float(lam.sum()) <= 0.0:
        raise TrainingError("the features do not vary at all in the data")
    lam = np.maximum(lam, T2_FLOOR_REL * lam[0])
    p = vt.T
    t2_map = (p / np.sqrt(lam)) @ p.T / np.sqrt(len(lam))
    return _Pca(t2_map=t2_map, spe_map=np.zeros((f, f)), k=len(lam), kept=1.0)


FAMILIES: Final = ("pca", "t2")
"""Detector families: ``pca`` (T² in the components keeping ``variance`` + SPE, the
default) and ``t2`` (T² in every component: simpler, no residual)."""
PROBE_SHIFT: Final = 3.0
"""``family="auto"`` compares the families on out-of-fold rows with one feature at a time
shifted by this many standard deviations: the share each detects at its own threshold."""


def _fit_family(z: Array, family: str, variance: float) -> _Pca:
    return _fit_t2(z) if family == "t2" else _fit_pca(z, variance)


def _phi(z: Array, pca: _Pca) -> Array:
    a = z @ pca.t2_map
    b = z @ pca.spe_map
    return np.asarray((a * a + b * b).sum(axis=1))


EXCURSION_FACTOR: Final = 3.0
"""An out-of-fold score this many times the folds' median threshold is an excursion (a
spike, a glitch): for a healthy, roughly Gaussian row that is a chance of about 1e-8."""
HANDFUL_ROWS: Final = 8
HANDFUL_SHARE: Final = 0.01
"""At most max(8 rows, 1 % of the rows) are excursions: one raw spike reaches every window
that covers it (a handful of rows). More than that above the limit is a way of running the
training data holds (a regime, a fold unlike the others), not an excursion: it is kept."""
DRIVEN_RATIO: Final = 1.5
"""A fold, or the top handful of rows, drives the threshold when leaving it out lowers the
threshold by this factor or more."""


@dataclass(frozen=True)
class Calibration:
    """The raise threshold and its evidence: which out-of-fold scores set it, how they vary.

    Row numbers are those of the data given to `fit_anomaly`. ``folds``: the rows of each
    cross-validation block (excursions not among them); ``per_fold``: the threshold each
    fold's own out-of-fold scores give (margin x their quantile), the spread a user sees
    on the card; ``without_fold``: the threshold with each fold's rows left out;
    ``excursions``: rows left out of the fit and the threshold, with their out-of-fold
    ``excursion_scores``; ``untrimmed``: the threshold had they been kept; ``without_top``:
    the threshold without the ``top_rows`` highest scores.
    """

    threshold: float
    folds: list[NDArray[np.intp]]
    per_fold: list[float]
    without_fold: list[float]
    excursions: NDArray[np.intp]
    excursion_scores: Array
    untrimmed: float
    without_top: float
    top_rows: int

    @property
    def driving_fold(self) -> int | None:
        """The fold without which the threshold would be ``DRIVEN_RATIO`` times lower."""
        i = int(np.argmin(self.without_fold))
        return i if self.threshold >= DRIVEN_RATIO * self.without_fold[i] else None

    @property
    def driven_by_top_rows(self) -> bool:
        """Whether the few highest scores alone hold the threshold ``DRIVEN_RATIO`` up."""
        return self.threshold >= DRIVEN_RATIO * self.without_top


def _level(scores: Array, quantile: float, margin: float) -> float:
    return margin * float(np.quantile(scores, quantile)) if len(scores) else 0.0


def find_excursions(
    oof: Array, folds: Sequence[NDArray[np.intp]], quantile: float, margin: float
) -> NDArray[np.intp]:
    """Rows scoring above ``EXCURSION_FACTOR`` x the median of the per-fold thresholds, if
    they are a handful (none otherwise). The median of the folds is what one excursion
    cannot move: it lands in one fold."""
    limit = EXCURSION_FACTOR * float(np.median([_level(oof[f], quantile, margin) for f in folds]))
    above = np.flatnonzero(oof > limit)
    handful = max(HANDFUL_ROWS, int(np.ceil(HANDFUL_SHARE * len(oof))))
    return above if len(above) <= handful else np.empty(0, dtype=np.intp)


def calibrate(
    oof: Array, folds: Sequence[NDArray[np.intp]], quantile: float, margin: float
) -> Calibration:
    """``margin`` x the ``quantile`` of the out-of-fold scores, and its spread over folds."""
    n = len(oof)
    top_rows = max(1, min(HANDFUL_ROWS, int(np.ceil(n * (1.0 - quantile))) + 2))
    without_fold = []
    for f in folds:
        rest = np.ones(n, dtype=bool)
        rest[f] = False
        without_fold.append(_level(oof[rest], quantile, margin))
    threshold = _level(oof, quantile, margin)
    return Calibration(
        threshold=threshold,
        folds=list(folds),
        per_fold=[_level(oof[f], quantile, margin) for f in folds],
        without_fold=without_fold,
        excursions=np.empty(0, dtype=np.intp),
        excursion_scores=np.empty(0),
        untrimmed=threshold,
        without_top=_level(np.sort(oof)[: n - top_rows], quantile, margin),
        top_rows=top_rows,
    )


def _out_of_fold(
    x: Array,
    names: Sequence[str],
    variance: float,
    folds: Sequence[NDArray[np.intp]],
    family: str = "pca",
    probe: bool = False,
) -> tuple[Array, Array]:
    """Each block scored by a model fitted on the other blocks; with ``probe``, also its
    rows with each feature in turn shifted by ``PROBE_SHIFT`` (rows x features)."""
    n, f = x.shape
    oof = np.empty(n)
    probes = np.empty((n, f) if probe else (0, f))
    for block in folds:
        rest = np.setdiff1d(np.arange(n), block)
        t = fit_transform(x[rest], names)
        model = _fit_family(t.apply(x[rest]), family, variance)
        z = t.apply(x[block])
        oof[block] = _phi(z, model)
        if probe:
            for j in range(f):
                shifted = z.copy()
                shifted[:, j] += PROBE_SHIFT
                probes[block, j] = _phi(shifted, model)
    return oof, probes


def fit_anomaly(
    x: Array,
    names: Sequence[str],
    *,
    variance: float = TRAINING.variance,
    folds: int = TRAINING.folds,
    quantile: float = TRAINING.quantile,
    margin: float = TRAINING.margin,
    clear_fraction: float = TRAINING.clear_fraction,
    critical_factor: float = TRAINING.critical_factor,
    family: str = TRAINING.family,
) -> AnomalyModel:
    """Fit on healthy rows (``x``: rows x features, float64, finite).

    The raise threshold is ``margin`` x the ``quantile`` of *out-of-fold* scores: each
    of ``folds`` contiguous blocks scored by a model fitted on the others, so the
    threshold is not flattered by scoring the data the model has seen. The clear
    threshold is ``clear_fraction`` of it.

    Excursions (`find_excursions`: a handful of rows far above what every fold agrees
    on) are left out of the fit and the threshold, and the folds drawn again without
    them: on a few hundred rows the quantile is set by the top one or two scores, and
    one spike in the training stretch (|z| = 30 on one sensor) lifted it 70-280 times,
    while the spike's variance blinded the model to a later fault of that sensor. On
    data without excursions the model is what it was without this step.

    ``family``: ``pca``, ``t2`` (`FAMILIES`), or ``auto``: both fitted, and the one that
    detects more out-of-fold rows with one feature shifted by ``PROBE_SHIFT`` standard
    deviations at its own threshold is chosen (the PCA family on a tie); the card's
    evaluation records both shares.
    """
    x = np.asarray(x, dtype=np.float64)
    n, f = x.shape
    if f != len(names):
        raise TrainingError(f"{f} columns but {len(names)} feature names")
    if not np.isfinite(x).all():
        raise TrainingError("the data holds NaN or infinite values")
    need = max(30, 3 * f, 5 * folds)
    if n < need:
        raise TrainingError(f"{n} rows of {f} features: need at least {need}")
    if not 0.5 <= variance < 1.0:
        raise TrainingError("variance: expected 0.5 <= variance < 1")
    if family not in (*FAMILIES, "auto"):
        raise TrainingError(f"family: {family!r} is not one of {', '.join(FAMILIES)}, auto")
    first = "t2" if family == "t2" else "pca"
    oof, _ = _out_of_fold(x, names, variance, contiguous_folds(n, folds), first)
    excursions = find_excursions(oof, contiguous_folds(n, folds), quantile, margin)
    kept = np.setdiff1d(np.arange(n), excursions)
    blocks = contiguous_folds(len(kept), folds)
    untrimmed = _level(oof, quantile, margin)
    results: dict[str, tuple[Array, Calibration, Array]] = {}
    for candidate in FAMILIES if family == "auto" else (family,):
        scores, probes = oof.copy(), np.empty((0, f))
        if len(excursions) or candidate != first or family == "auto":
            scores[kept], probes = _out_of_fold(
                x[kept], names, variance, blocks, candidate, probe=family == "auto"
            )
        results[candidate] = (scores, calibrate(scores[kept], blocks, quantile, margin), probes)
    detection: dict[str, float] = {}
    if family == "auto":
        detection = {
            c: round(float((pr >= c_cal.threshold).mean()), 6)
            for c, (_, c_cal, pr) in results.items()
        }
        family = "t2" if detection["t2"] > detection["pca"] else "pca"
    oof, cal, _ = results[family]
    if len(excursions):
        cal = replace(
            cal,
            folds=[kept[b] for b in blocks],
            excursions=excursions,
            excursion_scores=oof[excursions],
            untrimmed=untrimmed,
        )
    transform = fit_transform(x[kept], names)
    pca = _fit_family(transform.apply(x[kept]), family, variance)
    raise_threshold = cal.threshold
    in_sample = _phi(transform.apply(x), pca)
    evaluation = {
        "rows": len(kept),
        "features": f,
        "components": pca.k,
        "variance_kept": round(pca.kept, 6),
        "score_median_in_sample": round(float(np.median(in_sample)), 6),
        "score_median_out_of_fold": round(float(np.median(oof)), 6),
        "score_q99_out_of_fold": round(float(np.quantile(oof, 0.99)), 6),
        f"score_q{quantile * 100:g}_out_of_fold": round(float(np.quantile(oof[kept], quantile)), 6),
        "breach_rate_in_sample": round(float((in_sample >= raise_threshold).mean()), 6),
        "breach_rate_out_of_fold": round(float((oof >= raise_threshold).mean()), 6),
        "raise_threshold_per_fold": [round(v, 6) for v in cal.per_fold],
        "raise_threshold_without_fold": [round(v, 6) for v in cal.without_fold],
        "excursions_left_out": len(excursions),
        "family": family,
        **({"probe_detection_out_of_fold": detection} if detection else {}),
        "log_features": [name for name, lg in zip(names, transform.log, strict=True) if lg],
    }
    return AnomalyModel(
        features=list(names),
        transform=transform,
        t2_map=pca.t2_map,
        spe_map=pca.spe_map,
        components=pca.k,
        variance_kept=pca.kept,
        raise_threshold=raise_threshold,
        clear_threshold=clear_fraction * raise_threshold,
        critical_threshold=critical_factor * raise_threshold,
        evaluation=evaluation,
        calibration=cal,
        family=family,
    )


# ---- remaining useful life -----------------------------------------------------------


@dataclass(frozen=True)
class RulModel:
    features: list[str]
    transform: Transform
    coef: Array
    intercept: float
    cap: float
    lower: float
    """Offset of the lower bound: the 5th percentile of out-of-fold residuals."""
    upper: float
    """Offset of the upper bound: the 95th percentile."""
    alpha: float
    evaluation: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: Array) -> tuple[Array, Array, Array]:
        """RUL and its 90 % interval, each clipped to [0, cap]: float64 reference."""
        z = self.transform.apply(np.asarray(x, dtype=np.float64))
        raw = z @ self.coef + self.intercept
        clip = np.clip
        return (
            clip(raw, 0.0, self.cap),
            clip(raw + self.lower, 0.0, self.cap),
            clip(raw + self.upper, 0.0, self.cap),
        )


def rul_targets(ts_ms: Array, runs: NDArray[np.intp], unit_s: float, cap: float) -> Array:
    """Time to the end of each run (the failure), in ``unit_s`` seconds, clipped at ``cap``."""
    y = np.empty(len(ts_ms))
    for r in np.unique(runs):
        rows = runs == r
        y[rows] = (ts_ms[rows].max() - ts_ms[rows]) / 1000.0 / unit_s
    return np.minimum(y, cap)


def _ridge(z: Array, y: Array, alpha: float) -> tuple[Array, float]:
    n, f = z.shape
    mean_y = float(y.mean())
    gram = z.T @ z + alpha * n * np.eye(f)
    coef = np.linalg.solve(gram, z.T @ (y - mean_y))
    return coef, mean_y


def fit_rul(
    x: Array,
    y: Array,
    names: Sequence[str],
    *,
    runs: NDArray[np.intp] | None = None,
    cap: float = TRAINING.rul_cap,
    alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    folds: int = TRAINING.folds,
) -> RulModel:
    """Ridge regression of ``y`` (already clipped at ``cap``) on the transformed features.

    ``alpha`` (the penalty, per row) is chosen by cross-validation: leave-one-run-out
    when there are several runs (at most ``folds`` groups), contiguous blocks of the
    one run otherwise. The interval comes from the out-of-fold residuals at that alpha.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, f = x.shape
    if f != len(names) or len(y) != n:
        raise TrainingError("rows, targets and feature names do not line up")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise TrainingError("the data holds NaN or infinite values")
    need = max(30, 3 * f, 5 * folds)
    if n < need:
        raise TrainingError(f"{n} rows of {f} features: need at least {need}")
    if np.ptp(y) == 0.0:
        raise TrainingError("the target does not vary: record a run to failure")
    if runs is not None and len(np.unique(runs)) > 1:
        groups = np.unique(runs)
        splits = [np.flatnonzero(np.isin(runs, g)) for g in np.array_split(groups, folds) if len(g)]
    else:
        splits = contiguous_folds(n, folds)
    best: tuple[float, float, Array] | None = None
    for alpha in alphas:
        pred = np.empty(n)
        for block in splits:
            rest = np.setdiff1d(np.arange(n), block)
            t = fit_transform(x[rest], names)
            coef, b = _ridge(t.apply(x[rest]), y[rest], alpha)
            pred[block] = np.clip(t.apply(x[block]) @ coef + b, 0.0, cap)
        rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
        if best is None or rmse < best[0] - 1e-12:
            best = (rmse, alpha, pred)
    assert best is not None
    rmse, alpha, pred = best
    residual = y - pred
    transform = fit_transform(x, names)
    coef, intercept = _ridge(transform.apply(x), y, alpha)
    lower = float(np.quantile(residual, 0.05))
    upper = float(np.quantile(residual, 0.95))
    inside = float(
        ((y >= np.clip(pred + lower, 0, cap)) & (y <= np.clip(pred + upper, 0, cap))).mean()
    )
    evaluation = {
        "rows": n,
        "features": f,
        "runs": len(np.unique(runs)) if runs is not None else 1,
        "alpha": alpha,
        "rmse_out_of_fold": round(rmse, 6),
        "mae_out_of_fold": round(float(np.mean(np.abs(residual))), 6),
        "interval_coverage_out_of_fold": round(inside, 6),
        "log_features": [name for name, lg in zip(names, transform.log, strict=True) if lg],
    }
    return RulModel(
        features=list(names),
        transform=transform,
        coef=coef,
        intercept=intercept,
        cap=cap,
        lower=lower,
        upper=upper,
        alpha=alpha,
        evaluation=evaluation,
    )
