"""``uns record``, ``uns model …`` and ``uns audit verify`` as plain functions.

`uns.cli` wires them into typer; here they take paths and values, return what to
print, and raise `CommandError` (exit 1) with a message for the user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from uns.bus import connect
from uns.config import BrokerSettings
from uns.errors import BusError, UnsError
from uns.payloads import now_ms
from uns_inference import audit, record, signing
from uns_inference import card as cards
from uns_inference.card import KINDS, Card
from uns_inference.signing import CARD_FILE, MODEL_FILE, SIG_FILE

if TYPE_CHECKING:
    from uns_inference import train

log = logging.getLogger(__name__)

UNITS_S: Final = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


class CommandError(UnsError):
    """A command that cannot do what was asked; the message says why."""


# ---- uns record ------------------------------------------------------------------------


STOP_GRACE_S: Final = 1.0
"""After Ctrl-C or SIGTERM, how long a clean disconnect may take before it is cut short
(a broker still sending a backlog must not hold the recorder)."""


@dataclass
class _Recorded:
    written: int = 0
    reached: bool = False


async def record_messages(
    url: str,
    settings: BrokerSettings,
    topic_filter: str,
    out: Path,
    *,
    stop: asyncio.Event,
    duration: float | None = None,
    count: int | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Append every message matching ``topic_filter`` to ``out`` (JSON lines) until
    ``duration`` seconds, ``count`` messages or ``stop``; return how many were written.

    ``stop`` ends it at once, whatever it is waiting for (the next message, the broker,
    a subscription), with every line written so far whole and flushed. An unreachable
    or lost broker is retried with a jittered backoff, one line per try; `CommandError`
    if it was never reached."""
    state = _Recorded()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("ab") as f:
        work = asyncio.create_task(
            _record(url, settings, topic_filter, f, state, stop, duration, count, say)
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
    say: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + duration if duration is not None else None
    delay = 0.5

    def remaining() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    while not stop.is_set() and (deadline is None or remaining()):
        try:
            async with connect(url, settings=settings) as bus:
                await bus.subscribe(topic_filter, qos=1)
                state.reached = True
                delay = 0.5
                try:
                    async with asyncio.timeout(remaining()):
                        async for message in bus.messages():
                            # one write of a whole line, flushed before the next await:
                            # whenever the recorder is stopped, the file is valid
                            f.write(
                                record.encode_line(
                                    message.topic, now_ms(), message.retain, message.payload
                                )
                            )
                            f.flush()
                            state.written += 1
                            if count is not None and state.written >= count:
                                return
                except TimeoutError:
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
        f" contributions. Raise threshold = {margin:g} x the {quantile * 100:g}th percentile of"
        f" out-of-fold scores ({folds} contiguous time blocks, each scored by a model fitted"
        " on the others), clear threshold below it for hysteresis. Chosen over a deep"
        " model: it needs only healthy data, trains in milliseconds, explains each score"
        " by feature, and is a handful of ONNX operators anyone can audit."
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
    exclude: Sequence[str] = record.DEFAULT_EXCLUDE,
    devices: Sequence[str] = (),
    max_age_s: float = 120.0,
    variance: float = 0.95,
    quantile: float = 0.999,
    margin: float = 1.2,
    clear_fraction: float = 0.7,
    min_raise_s: float = 10.0,
    min_clear_s: float = 30.0,
    rul_unit: str = "h",
    rul_cap: float = 125.0,
    created: str | None = None,
) -> tuple[Card, list[str]]:
    """Fit a model on recordings and write ``model.onnx`` + ``card.json`` into ``out``.

    ``plant`` (device path -> asset type, from the config) gives the asset type when
    ``asset`` is not given, and leaves out recorded devices of other asset types.
    Returns the card and notes for the user (dropped or suspicious features).
    """
    # onnx and the training maths only here: `uns record` starts (and exits) without them
    from uns_inference import build, train

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
        ds = record.matrix(flog, names, max_age_s)
        constant = train.constant_features(ds.x, names)
        if constant:
            notes.append(f"left out, constant in the data: {', '.join(constant)}")
            names = [n for n in names if n not in constant]
            if not names:
                raise CommandError("every feature is constant in the data")
            ds = record.matrix(flog, names, max_age_s)
        if flog.stats.skipped:
            notes.append(f"{flog.stats.skipped} of {flog.stats.lines} lines skipped (undecodable)")
        params: dict[str, object] = {"max_feature_age_s": max_age_s, "exclude": list(exclude)}
        if include:
            params["include"] = list(include)
        folds = 5
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
            )
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
            params.update(clear_fraction=clear_fraction)
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
