"""``uns record``, ``uns model ...`` and ``uns audit verify``: the model lifecycle.

The work is done by plain functions (`record_messages`, `model_train`, `model_sign`,
`model_verify`, `model_info`, `model_promote`, `model_keygen`, `audit_verify`): they take
paths and values, return what to print, and raise `CommandError` (exit 1) with a message
for the user; the evaluation and the default models call them too. The Typer commands
at the end wire them to the command line (entry points ``record``, ``model``, ``audit``).

Light to import (`uns --help` lists these commands): numpy, onnx and onnxruntime are
imported by the functions that need them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Final

import typer

from uns.bus import connect
from uns.commands import (
    BrokerOpt,
    ConfigOpt,
    fail,
    load_config,
    run,
    struct_options,
    watch_target,
)
from uns.config import BrokerSettings, LoadedConfig
from uns.errors import BusError, ConfigError, PayloadError, UnsError
from uns.payloads import END_OF_REPLAY, DeviceDeath, decode, now_ms
from uns.topics import matches
from uns_inference import audit, signing
from uns_inference import card as cards
from uns_inference.card import KINDS, Card
from uns_inference.options import DEFAULT_EXCLUDE, TRAINING, Training
from uns_inference.settings import InferenceSettings
from uns_inference.signing import CARD_FILE, MODEL_FILE, SIG_FILE

if TYPE_CHECKING:
    from uns_inference import record, train

log = logging.getLogger(__name__)

UNITS_S: Final = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


class CommandError(UnsError):
    """A command that cannot do what was asked; the message says why."""


# ---- uns record ------------------------------------------------------------------------


STOP_GRACE_S: Final = 1.0
"""After Ctrl-C or SIGTERM, how long a clean disconnect may take before it is cut short
(a broker still sending a backlog must not hold the recorder)."""


REPLAY_DEATHS: Final = "+/+/+/+/+/+/raw/death"
"""Where a replay says it has ended (subscribed with ``--until-replay-end``, not recorded)."""
REPLAY_END_QUIET_S: Final = 2.0
"""With ``--until-replay-end``: how long nothing more must come after every replay ended."""


@dataclass
class _Recorded:
    written: int = 0
    reached: bool = False


@dataclass
class _Ending:
    """When a recording is over besides a duration or a count: a quiet spell after the first
    message, or every recorded device's replay ended (and then a quiet spell)."""

    idle_s: float | None
    replay_end: bool
    devices: set[str] = field(default_factory=set)
    """Devices recorded from (the first six levels of a recorded topic)."""
    ended: set[str] = field(default_factory=set)
    """Devices whose replay ended."""

    def wait_s(self, written: int) -> float | None:
        """How long to wait for the next message before the recording is over."""
        if self.replay_end:
            if written and self.devices and self.devices <= self.ended:
                return self.idle_s if self.idle_s is not None else REPLAY_END_QUIET_S
            return None
        return self.idle_s if written else None

    def saw(self, topic: str, payload: bytes, recorded: bool) -> None:
        device = "/".join(topic.split("/")[:6])
        if recorded and "/_node/" not in topic:
            self.devices.add(device)
        if topic.endswith("/raw/death") and payload:
            try:
                death: DeviceDeath = decode(payload, DeviceDeath)
            except PayloadError:
                return
            if death.reason.startswith(END_OF_REPLAY):
                self.ended.add(device)


async def record_messages(
    url: str,
    settings: BrokerSettings,
    topic_filter: str,
    out: Path,
    *,
    stop: asyncio.Event,
    duration: float | None = None,
    count: int | None = None,
    until_idle: float | None = None,
    until_replay_end: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Append every message matching ``topic_filter`` to ``out`` (JSON lines) until
    ``duration`` seconds, ``count`` messages or ``stop``; return how many were written.

    ``until_idle``: also stop once that many seconds pass without a recorded message, after
    the first. ``until_replay_end``: also stop once every device recorded from has ended
    its replay (its raw death, reason ``END_OF_REPLAY``) and nothing more came for
    ``until_idle`` (default `REPLAY_END_QUIET_S`: the featurizer's last windows follow the
    replay's end).

    ``stop`` ends it at once, whatever it is waiting for (the next message, the broker,
    a subscription), with every line written so far whole and flushed. An unreachable
    or lost broker is retried with a jittered backoff, one line per try; `CommandError`
    if it was never reached."""
    state = _Recorded()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("ab") as f:
        ending = _Ending(until_idle, until_replay_end)
        work = asyncio.create_task(
            _record(url, settings, topic_filter, f, state, stop, duration, count, ending, say)
        )
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not work.done():
                work.cancel()  # out of the message loop; the connection closes cleanly ...
                await asyncio.wait({work}, timeout=STOP_GRACE_S)
                if not work.done():
                    work.cancel()  # ... unless the broker keeps it waiting
                await asyncio.wait({work})
            f.flush()
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]
    if not state.reached:
        raise CommandError(f"never reached the broker at {url}")
    return state.written


async def _record(
    url: str,
    settings: BrokerSettings,
    topic_filter: str,
    f: IO[bytes],
    state: _Recorded,
    stop: asyncio.Event,
    duration: float | None,
    count: int | None,
    ending: _Ending,
    say: Callable[[str], None],
) -> None:
    from uns_inference import record  # numpy

    deadline = time.monotonic() + duration if duration is not None else None
    delay = 0.5

    def remaining() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    while not stop.is_set() and (deadline is None or remaining()):
        try:
            async with connect(url, settings=settings) as bus:
                await bus.subscribe(topic_filter, qos=1)
                if ending.replay_end and not matches(topic_filter, REPLAY_DEATHS):
                    await bus.subscribe(REPLAY_DEATHS, qos=1)  # seen, not recorded
                if not state.reached:
                    say(f"subscribed to {topic_filter!r}; recording")
                state.reached = True
                delay = 0.5
                incoming = bus.messages().__aiter__()
                while True:
                    quiet = ending.wait_s(state.written)
                    left = remaining()
                    wait = min(x for x in (quiet, left) if x is not None) if quiet or left else None
                    if left == 0:
                        return
                    try:
                        message = await asyncio.wait_for(anext(incoming), wait)
                    except TimeoutError:
                        if quiet is not None and (left is None or quiet <= left):
                            ended = "every replay ended and " if ending.replay_end else ""
                            say(f"stopping: {ended}nothing came for {quiet:g} s")
                        return
                    recorded = matches(topic_filter, message.topic)
                    ending.saw(message.topic, message.payload, recorded)
                    if not recorded:
                        continue
                    # one write of a whole line, flushed before the next await:
                    # whenever the recorder is stopped, the file is valid
                    f.write(
                        record.encode_line(message.topic, now_ms(), message.retain, message.payload)
                    )
                    f.flush()
                    state.written += 1
                    if count is not None and state.written >= count:
                        return
        except BusError as exc:
            wait = delay * random.uniform(0.8, 1.2)
            say(f"{exc}; retrying in {wait:.1f} s")
            try:
                await asyncio.wait_for(stop.wait(), min(wait, remaining() or wait))
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)


# ---- uns model train -----------------------------------------------------------------


def _anomaly_method(m: train.AnomalyModel, folds: int, quantile: float, margin: float) -> str:
    threshold = (
        f"Raise threshold = {margin:g} x the {quantile * 100:g}th percentile of out-of-fold"
        f" scores ({folds} contiguous time blocks, each scored by a model fitted on the others;"
        " a handful of excursions far above what every block agrees on are left out of the"
        " fit and the threshold), clear threshold below it for hysteresis."
    )
    if m.family == "t2":
        return (
            "Hotelling's T² on standardised features (band energies and envelope amplitudes"
            f" log-transformed first) in all {m.components} principal components (the"
            " Mahalanobis distance), divided by their number so a healthy window scores about"
            " 1; a sum of squares of one linear map of the standardised vector, so it splits"
            f" into non-negative per-feature contributions. {threshold}" + _chosen(m)
        )
    return (
        "PCA process monitoring on standardised features (band energies and envelope"
        " amplitudes log-transformed first: they are positive and multiplicative). Score ="
        f" (T²/k + SPE/θ)/2: Hotelling's T² in the k = {m.components} principal components"
        f" that keep {m.variance_kept:.1%} of the variance sees faults that move features"
        " along their usual correlations (RMS, peak and band energies rising together); the squared"
        " reconstruction error SPE sees faults that break them (an envelope line at BPFO"
        " without an RMS rise). Each is divided by its mean on the training data, so a"
        " healthy window scores about 1, and both are sums of squares of linear maps of the"
        " standardised vector, so the score splits exactly into non-negative per-feature"
        f" contributions. {threshold} Chosen over a deep"
        " model: it needs only healthy data, trains in milliseconds, explains each score"
        " by feature, and is a handful of ONNX operators anyone can audit." + _chosen(m)
    )


def _chosen(m: train.AnomalyModel) -> str:
    detection = m.evaluation.get("probe_detection_out_of_fold")
    if not detection:
        return ""
    from uns_inference import train

    return (
        f" Chosen by --family auto: with one feature at a time shifted by"
        f" {train.PROBE_SHIFT:g} standard deviations, out of fold, it detects"
        f" {detection[m.family]:.1%} of the rows at its threshold, the other family"
        f" {max(v for k, v in detection.items() if k != m.family):.1%}."
    )


def _rul_method(m: train.RulModel, cap: float, unit: str) -> str:
    return (
        f"Ridge regression (alpha {m.alpha:g} per row, chosen by cross-validation over runs or"
        " time blocks) of remaining useful life on standardised features (energies"
        f" log-transformed). The target is the time to the end of each recorded run (the"
        f" failure) clipped at {cap:g} {unit}, the C-MAPSS piecewise-linear protocol: early in"
        " life degradation is not observable, so the model is not asked to tell 300 h from"
        f" 200 h. Predictions are clipped to [0, {cap:g}]; rul_lower/rul_upper add the 5th and"
        " 95th percentiles of the out-of-fold errors. Chosen for few run-to-failure"
        " histories: a linear model is hard to overfit, auditable, and a few ONNX operators."
    )


def _for_asset(
    flog: record.FeatureLog, asset: str | None, plant: Mapping[str, str], notes: list[str]
) -> str:
    """The asset type to train for; the log narrowed to its devices (per the plant config)."""
    known = {d: plant[d] for d in flog.devices if d in plant}
    if asset is None:
        assets = set(known.values())
        if len(assets) != 1 or len(known) != len(flog.devices):
            raise CommandError(
                "give --asset: the recorded devices "
                + ", ".join(f"{d} ({plant.get(d, 'not in the config')})" for d in flog.devices)
                + " do not have one asset type in the config"
            )
        return assets.pop()
    other = {d for d, a in known.items() if a != asset}
    if other:
        notes.append(f"left out, not of asset type {asset}: {', '.join(sorted(other))}")
        flog.data = [item for item in flog.data if item[1] not in other]
        for d in other:
            flog.seen.pop(d, None)
            flog.announced.pop(d, None)
    return asset


def data_time_ms(text: str, option: str) -> int:
    """``--from``/``--to``: epoch milliseconds, or ISO 8601 (UTC when it names no zone)."""
    value = text.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            f"{option}: {text!r} is neither ISO 8601 (2025-11-22T09:15:00Z) nor epoch ms"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1000)


def _utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _between(ds: record.Dataset, start_ms: int | None, end_ms: int | None) -> record.Dataset:
    """The rows whose data time (window end) is in [start_ms, end_ms)."""
    import numpy as np

    if start_ms is None and end_ms is None:
        return ds
    keep = np.ones(len(ds.ts), dtype=bool)
    if start_ms is not None:
        keep &= ds.ts >= start_ms
    if end_ms is not None:
        keep &= ds.ts < end_ms
    if not keep.any():
        raise CommandError(
            f"--from/--to: no row between {_utc(start_ms) if start_ms is not None else 'the start'}"
            f" and {_utc(end_ms) if end_ms is not None else 'the end'}: the recording holds"
            f" {_utc(int(ds.ts.min()))} to {_utc(int(ds.ts.max()))}"
        )
    return replace(
        ds,
        x=ds.x[keep],
        ts=ds.ts[keep],
        device=[d for d, k in zip(ds.device, keep, strict=True) if k],
        run=ds.run[keep],
    )


def _threshold_warnings(am: train.AnomalyModel, ds: record.Dataset) -> list[str]:
    """What the user should know before trusting the raise threshold: rows left out of it,
    and a fold or a few rows that hold it up."""
    from uns_inference import train

    cal = am.calibration
    if cal is None:
        return []
    out = []
    if len(cal.excursions):
        rows = ", ".join(
            f"{ds.device[i]} at {_utc(int(ds.ts[i]))} (score {s:.3g})"
            for i, s in zip(cal.excursions[:5], cal.excursion_scores[:5], strict=False)
        )
        more = f" and {len(cal.excursions) - 5} more" if len(cal.excursions) > 5 else ""
        out.append(
            f"WARNING: {len(cal.excursions)} row(s) left out of the fit and the threshold:"
            f" excursions above {train.EXCURSION_FACTOR:g} x the folds' median threshold:"
            f" {rows}{more}; with them the raise threshold would be {cal.untrimmed:.4g}, not"
            f" {cal.threshold:.4g}. A glitch, or a way of running the model should learn?"
        )
    fold = cal.driving_fold
    if fold is not None:
        rows_of = cal.folds[fold]
        out.append(
            f"WARNING: one fold drives the raise threshold: without its {len(rows_of)} rows"
            f" ({_utc(int(ds.ts[rows_of].min()))} to {_utc(int(ds.ts[rows_of].max()))}) it would"
            f" be {cal.without_fold[fold]:.4g}, not {cal.threshold:.4g}; that stretch runs unlike"
            " the rest (leave it out with --from/--to, or record more like it)"
        )
    elif cal.driven_by_top_rows:
        out.append(
            f"WARNING: the {cal.top_rows} highest out-of-fold scores drive the raise threshold:"
            f" without them it would be {cal.without_top:.4g}, not {cal.threshold:.4g};"
            " record more healthy data, or give a lower --quantile"
        )
    return out


def model_train(
    data: Sequence[Path],
    kind: str,
    out: Path,
    *,
    asset: str | None = None,
    plant: Mapping[str, str] | None = None,
    name: str | None = None,
    version: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    devices: Sequence[str] = (),
    max_age_s: float = TRAINING.max_age_s,
    variance: float = TRAINING.variance,
    quantile: float = TRAINING.quantile,
    margin: float = TRAINING.margin,
    folds: int = TRAINING.folds,
    family: str = TRAINING.family,
    clear_fraction: float = TRAINING.clear_fraction,
    min_raise_s: float = TRAINING.min_raise_s,
    min_clear_s: float = TRAINING.min_clear_s,
    rul_unit: str = TRAINING.rul_unit,
    rul_cap: float = TRAINING.rul_cap,
    start_ms: int | None = None,
    end_ms: int | None = None,
    created: str | None = None,
) -> tuple[Card, list[str]]:
    """Fit a model on recordings and write ``model.onnx`` + ``card.json`` into ``out``.

    ``plant`` (device path -> asset type, from the config) gives the asset type when
    ``asset`` is not given, and leaves out recorded devices of other asset types.
    ``start_ms``/``end_ms``: only rows whose data time (window end) is in [start, end).
    Returns the card and notes for the user (dropped or suspicious features; those that
    start ``WARNING:`` say the raise threshold is not to be trusted as it is).
    """
    # numpy, onnx and the training maths only here: the other commands start without them
    from uns_inference import build, record, train

    if kind not in KINDS:
        raise CommandError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if rul_unit not in UNITS_S:
        raise CommandError(f"--rul-unit: {rul_unit!r} is not one of {', '.join(UNITS_S)}")
    for path in data:
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
    notes: list[str] = []
    try:
        flog = record.read_features(data, devices)
        asset = _for_asset(flog, asset, plant or {}, notes)
        names = record.choose_features(flog, include, exclude)
        ds = _between(record.matrix(flog, names, max_age_s), start_ms, end_ms)
        constant = train.constant_features(ds.x, names)
        if constant:
            notes.append(f"left out, constant in the data: {', '.join(constant)}")
            names = [n for n in names if n not in constant]
            if not names:
                raise CommandError("every feature is constant in the data")
            ds = _between(record.matrix(flog, names, max_age_s), start_ms, end_ms)
        if flog.stats.skipped:
            notes.append(f"{flog.stats.skipped} of {flog.stats.lines} lines skipped (undecodable)")
        params: dict[str, object] = {"max_feature_age_s": max_age_s, "exclude": list(exclude)}
        if include:
            params["include"] = list(include)
        if start_ms is not None:
            params["from"] = _utc(start_ms)
        if end_ms is not None:
            params["to"] = _utc(end_ms)
        if kind == "anomaly":
            trending = train.trending_features(ds.x, names)
            if trending:
                notes.append(
                    "trending through the recording (a counter? a warm-up?); the model will"
                    f" call their future values anomalous: {', '.join(trending)}"
                )
            am = train.fit_anomaly(
                ds.x,
                names,
                variance=variance,
                folds=folds,
                quantile=quantile,
                margin=margin,
                clear_fraction=clear_fraction,
                critical_factor=TRAINING.critical_factor,
                family=family,
            )
            notes.extend(_threshold_warnings(am, ds))
            graph = build.anomaly_onnx(am)
            transform, evaluation = am.transform, am.evaluation
            method = _anomaly_method(am, folds, quantile, margin)
            thresholds: cards.Thresholds | None = cards.Thresholds(
                raise_=round(am.raise_threshold, 6),
                clear=round(am.clear_threshold, 6),
                min_raise_s=min_raise_s,
                min_clear_s=min_clear_s,
                critical=round(am.critical_threshold, 6),
            )
            outputs = ["score", "contributions"]
            params.update(variance=variance, quantile=quantile, margin=margin, folds=folds)
            params.update(clear_fraction=clear_fraction, family=family)
        else:
            y = train.rul_targets(ds.ts.astype(float), ds.run, UNITS_S[rul_unit], rul_cap)
            rm = train.fit_rul(ds.x, y, names, runs=ds.run, cap=rul_cap, folds=folds)
            graph = build.rul_onnx(rm)
            transform, evaluation = rm.transform, rm.evaluation
            method = _rul_method(rm, rul_cap, rul_unit)
            thresholds = None
            outputs = ["rul", "rul_lower", "rul_upper"]
            params.update(rul_unit=rul_unit, rul_cap=rul_cap, alpha=rm.alpha)
    except (train.TrainingError, record.RecordingError) as exc:
        raise CommandError(str(exc)) from None
    sha = signing.sha256_bytes(graph)
    try:
        card = Card(
            name=name or f"{asset}-{kind}",
            version=version or time.strftime("%Y.%m.%d-%H%M%S", time.gmtime()),
            kind="anomaly" if kind == "anomaly" else "rul",
            asset=asset,
            method=method,
            features=list(names),
            outputs=outputs,
            normalisation=cards.Normalisation(
                means=[float(v) for v in transform.means],
                stds=[float(v) for v in transform.stds],
                log=[bool(v) for v in transform.log],
                offsets=[float(v) for v in transform.offsets],
            ),
            thresholds=thresholds,
            rul_unit=rul_unit if kind == "rul" else "",
            rul_cap=rul_cap if kind == "rul" else None,
            training=cards.Training(
                rows=len(ds.x),
                data_sha256=record.data_sha256(data),
                created=created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                files=[p.name for p in data],
                devices=sorted(set(ds.device)),
                parameters=params,
            ),
            evaluation=evaluation,
            sha256=sha,
        )
        card = cards.decode(cards.encode(card))  # the same checks a reader applies
    except (ValueError, cards.CardError) as exc:
        raise CommandError(f"model card: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / SIG_FILE).unlink(missing_ok=True)  # a signature of an older model would lie
    (out / MODEL_FILE).write_bytes(graph)
    cards.write(out / CARD_FILE, card)
    return card, notes


# ---- signing, checking, looking --------------------------------------------------------


def _card_matching(directory: Path) -> tuple[Card, str, str]:
    """The card, the model's sha256 and the card's, checked to belong together."""
    try:
        card = cards.read(directory / CARD_FILE)
        model_sha = signing.sha256_file(directory / MODEL_FILE)
        card_sha = signing.sha256_file(directory / CARD_FILE)
    except (OSError, cards.CardError) as exc:
        raise CommandError(f"{directory}: {exc}") from None
    if card.sha256 != model_sha:
        raise CommandError(
            f"{directory}: {MODEL_FILE} (sha256 {model_sha[:12]}…) is not the model its card"
            f" describes ({card.sha256[:12]}…)"
        )
    return card, model_sha, card_sha


def model_sign(directory: Path, key: Path) -> Path:
    """Write ``model.onnx.sig``: the key's signature of both files' digests."""
    _, model_sha, card_sha = _card_matching(directory)
    try:
        private = signing.load_private_key(key)
    except signing.IntegrityError as exc:
        raise CommandError(str(exc)) from None
    path = directory / SIG_FILE
    path.write_bytes(signing.sign(private, model_sha, card_sha))
    return path


def model_verify(directory: Path, pubkey: Path) -> Card:
    """Check sha256 and signature, then load the graph into onnxruntime as the service does."""
    from uns_inference import onnxmodel

    try:
        key = signing.load_public_key(pubkey)
        return onnxmodel.load(directory, key).card
    except UnsError as exc:
        raise CommandError(f"{directory}: {exc}") from None


def model_info(directory: Path) -> str:
    try:
        card = cards.read(directory / CARD_FILE)
    except cards.CardError as exc:
        raise CommandError(str(exc)) from None
    model = directory / MODEL_FILE
    actual = signing.sha256_file(model) if model.exists() else "missing"
    lines = [
        f"{card.name} {card.version}  ({card.kind} model for asset type {card.asset})",
        f"sha256     {card.sha256}"
        + ("" if actual == card.sha256 else f"  MISMATCH: {MODEL_FILE} is {actual}"),
        "signature  "
        + ("present (check it: uns model verify)" if (directory / SIG_FILE).exists() else "none"),
        f"features   {len(card.features)}: {', '.join(card.features)}",
        f"outputs    {', '.join(card.outputs)}",
    ]
    if card.thresholds is not None:
        t = card.thresholds
        lines.append(
            f"thresholds raise {t.raise_:g}, clear {t.clear:g}, critical {t.critical:g},"
            f" min_raise_s {t.min_raise_s:g}, min_clear_s {t.min_clear_s:g}"
        )
    if card.kind == "rul":
        lines.append(f"rul        unit {card.rul_unit}, cap {card.rul_cap:g}")
    tr = card.training
    lines.append(
        f"training   {tr.rows} rows from {', '.join(tr.files) or '?'}"
        f" (sha256 {tr.data_sha256[:12]}…), {len(tr.devices)} device(s), created {tr.created}"
    )
    for key, value in card.evaluation.items():
        lines.append(f"  {key}: {value}")
    lines.append(f"method     {card.method}")
    return "\n".join(lines)


def model_keygen(prefix: Path) -> tuple[Path, Path]:
    try:
        return signing.generate_keypair(prefix)
    except signing.IntegrityError as exc:
        raise CommandError(str(exc)) from None


# ---- promotion and the audit log ----------------------------------------------------------


def _same_files(a: Path, b: Path) -> bool:
    for name in (MODEL_FILE, CARD_FILE, SIG_FILE):
        pa, pb = a / name, b / name
        if pa.exists() != pb.exists():
            return False
        if pa.exists() and signing.sha256_file(pa) != signing.sha256_file(pb):
            return False
    return True


def model_promote(
    directory: Path,
    models_dir: Path,
    *,
    audit_log: Path,
    pubkey: Path | None = None,
) -> tuple[Card, Path, str | None]:
    """Make ``directory`` the current model of its asset type and kind, atomically.

    Copies it to ``models_dir/<asset>/<kind>/<version>/`` (a temporary directory renamed
    into place) and replaces the ``current`` pointer file (write + rename); the inference
    service notices within ``reload_s``. Promoting a version that is already there
    (``models/press/anomaly/1.0.0``) only moves the pointer: that is a rollback. Returns
    the card, the version directory and the version it replaced.
    """
    if pubkey is not None:
        card = model_verify(directory, pubkey)
    else:
        card, _, _ = _card_matching(directory)
    slot = models_dir / card.asset / card.kind
    dest = slot / card.version
    slot.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if dest.resolve() != directory.resolve() and not _same_files(directory, dest):
            raise CommandError(
                f"{dest} exists with other files: a version is immutable, give this model a"
                " new --version"
            )
    else:
        tmp = slot / f".{card.version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in (MODEL_FILE, CARD_FILE, SIG_FILE):
            if (directory / name).exists():
                shutil.copy2(directory / name, tmp / name)
        os.rename(tmp, dest)
    pointer = slot / "current"
    try:
        previous: str | None = pointer.read_text(encoding="utf-8").strip() or None
    except OSError:
        previous = None
    staged = slot / f".current.tmp-{os.getpid()}"
    with staged.open("w", encoding="utf-8") as f:
        f.write(card.version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, pointer)
    audit.append(
        audit_log,
        "promote",
        ts=now_ms(),
        model=card.name,
        version=card.version,
        sha256=card.sha256,
        reason=f"replaces {previous}" if previous and previous != card.version else "",
    )
    return card, dest, previous


def audit_verify(path: Path) -> audit.Head:
    """The head of a sound log (its key is ``FILE.key``, its anchor ``FILE.anchor``);
    `CommandError` naming the first bad line, or the missing key or anchor, otherwise."""
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    try:
        problem = audit.verify(path)
    except audit.AuditKeyError as exc:
        raise CommandError(f"{path}: cannot be verified: {exc}") from None
    if problem is not None:
        raise CommandError(f"{path}: {problem}")
    return audit.head(path)


# ---- the command line --------------------------------------------------------------------

model_app = typer.Typer(
    help="Train, sign, check and promote models (ONNX + model card).", no_args_is_help=True
)
audit_app = typer.Typer(help="The model audit log.", no_args_is_help=True)


def _inference_defaults(loaded: LoadedConfig) -> InferenceSettings:
    try:
        return loaded.service("inference", InferenceSettings)
    except ConfigError as exc:
        raise fail(f"config: {exc}") from None


def record_command(
    topic_filter: Annotated[
        str, typer.Argument(metavar="FILTER", help="e.g. '+/+/+/+/+/+/features/#'")
    ],
    out: Annotated[Path, typer.Option(help="JSON-lines file to append to")],
    duration: Annotated[float | None, typer.Option(min=0.0, help="Stop after S seconds")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after N messages")] = None,
    until_idle: Annotated[
        float | None,
        typer.Option(min=0.1, help="Stop once S seconds pass without a message (after the first)"),
    ] = None,
    until_replay_end: Annotated[
        bool,
        typer.Option(
            "--until-replay-end",
            help="Stop once every device recorded from has ended its uns replay (its raw death"
            " says so) and nothing more came for 2 s (or --until-idle)",
        ),
    ] = False,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Record messages into a file for training: one {"topic", "ts", "retained", "payload"}
    per line (whichever of --duration, --count, --until-idle and --until-replay-end comes
    first; Ctrl-C stops too). Says on stderr when it is subscribed and why it stopped."""
    url, settings = watch_target(topic_filter, config, broker)

    async def main(stop: asyncio.Event) -> int:
        n: int = await record_messages(
            url,
            settings,
            topic_filter,
            out,
            stop=stop,
            duration=duration,
            count=count,
            until_idle=until_idle,
            until_replay_end=until_replay_end,
            say=lambda line: typer.echo(line, err=True),
        )
        return n

    try:
        written = run(main)
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"{written} messages written to {out}", err=True)


@model_app.command("train")
@struct_options(Training, "training", Training.ON_COMMAND_LINE)
def train_command(
    data: Annotated[
        list[Path], typer.Option("--data", help="A recording (uns record); repeat for several")
    ],
    kind: Annotated[str, typer.Option(help="anomaly or rul")],
    out: Annotated[Path, typer.Option(help="Directory for model.onnx and card.json")],
    name: Annotated[str | None, typer.Option(help="[default: ASSET-KIND]")] = None,
    version: Annotated[
        str | None, typer.Option(help="[default: the UTC time, e.g. 2025.11.22-091500]")
    ] = None,
    asset: Annotated[
        str | None,
        typer.Option(help="Asset type [default: that of the recorded devices in the config]"),
    ] = None,
    features: Annotated[
        list[str] | None, typer.Option("--features", help="Only features matching (glob, repeat)")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Leave out features matching (glob, repeat) [default: counter levels]"),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option(help="Only devices matching (glob, repeat)")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Only rows from this data time on (ISO 8601, UTC if no zone; or epoch ms)",
        ),
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Only rows before this data time (as --from)")
    ] = None,
    training: Training = TRAINING,
    config: ConfigOpt = None,
) -> None:
    """Fit a model on recorded features; writes model.onnx and card.json (sign it next)."""
    try:
        start_ms = data_time_ms(start, "--from") if start is not None else None
        end_ms = data_time_ms(end, "--to") if end is not None else None
    except CommandError as exc:
        raise fail(str(exc)) from None
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise fail(f"--to: {end} is not after --from {start}")
    loaded = load_config(config)
    plant = {d.path: d.asset for d in loaded.config.plant.devices}
    options: dict[str, Any] = {}
    if exclude is not None:
        options["exclude"] = exclude
    try:
        card, notes = model_train(
            data,
            kind,
            out,
            asset=asset,
            plant=plant,
            name=name,
            version=version,
            include=features or (),
            devices=device or (),
            variance=training.variance,
            quantile=training.quantile,
            margin=training.margin,
            folds=training.folds,
            family=training.family,
            min_raise_s=training.min_raise_s,
            min_clear_s=training.min_clear_s,
            rul_unit=training.rul_unit,
            rul_cap=training.rul_cap,
            start_ms=start_ms,
            end_ms=end_ms,
            **options,
        )
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    for note in notes:
        typer.echo(note if note.startswith("WARNING:") else f"note: {note}", err=True)
    typer.echo(model_info(out))
    if card.thresholds is not None:
        e = card.evaluation
        typer.echo(
            f"false alarms on the {card.training.rows} training rows (score >= raise"
            f" {card.thresholds.raise_:g}): in-sample {e['breach_rate_in_sample']:.2%},"
            f" out-of-fold {e['breach_rate_out_of_fold']:.2%}"
        )
    typer.echo(f"\nwrote {out}; next: uns model sign {out} --key KEYFILE", err=True)


@model_app.command("sign")
def sign_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (PEM), from uns model keygen")],
) -> None:
    """Sign a model: writes DIR/model.onnx.sig over the digests of model.onnx and card.json."""
    try:
        path = model_sign(directory, key)
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"wrote {path}")


@model_app.command("verify")
def verify_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
    pubkey: Annotated[Path, typer.Option(help="Ed25519 public key (PEM)")],
) -> None:
    """Check a model as the inference service does (sha256, signature, loadable); exit 1 if not."""
    try:
        card = model_verify(directory, pubkey)
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"ok: {card.name} {card.version} sha256 {card.sha256}, signed by {pubkey}")


@model_app.command("info")
def info_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
) -> None:
    """Show a model's card: features, thresholds, training data, evaluation, method."""
    try:
        typer.echo(model_info(directory))
    except CommandError as exc:
        raise fail(str(exc), code=1) from None


@model_app.command("promote")
def promote_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A (signed) model directory")],
    models_dir: Annotated[
        Path | None,
        typer.Option(help="[default: services.inference.models_dir of the config, models]"),
    ] = None,
    pubkey: Annotated[
        Path | None,
        typer.Option(help="Verify with this key first [default: services.inference.pubkey]"),
    ] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option(help="[default: services.inference.audit_log, var/model-audit.jsonl]"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Make DIR the current model of its asset type: copied to MODELS/<asset>/<kind>/<version>/,
    the `current` pointer replaced atomically; the running service hot-loads it. Promoting a
    version already there (MODELS/press/anomaly/1.0.0) is a rollback."""
    s = _inference_defaults(load_config(config))
    key = pubkey or (Path(s.pubkey) if s.pubkey else None)
    try:
        card, dest, previous = model_promote(
            directory,
            models_dir or Path(s.models_dir),
            audit_log=audit_log or Path(s.audit_log),
            pubkey=key,
        )
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    checked = "signature verified" if key else "signature NOT checked here (no --pubkey)"
    replaced = f", replacing {previous}" if previous and previous != card.version else ""
    typer.echo(f"{card.name} {card.version} is current for {card.asset}/{card.kind}{replaced}")
    typer.echo(f"  {dest} ({checked})")


@model_app.command("keygen")
def keygen_command(
    out: Annotated[Path, typer.Option(help="Writes OUT.key (private, 0600) and OUT.pub")],
) -> None:
    """Make an Ed25519 signing key pair: keep .key offline, give .pub to the edge boxes."""
    try:
        key, pub = model_keygen(out)
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"wrote {key} (private: keep it off the edge box) and {pub}")


@audit_app.command("verify")
def audit_verify_command(
    file: Annotated[Path, typer.Argument(help="e.g. var/model-audit.jsonl")],
) -> None:
    """Check the hash chain of an audit log; exit 1 naming the first edited or missing line."""
    try:
        head = audit_verify(file)
    except CommandError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"ok: {head.lines} lines, head sha256 {head.sha256}")
