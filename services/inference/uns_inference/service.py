"""``uns run inference``: features in, scores and anomaly events out, signed models hot-loaded.

Subscribes to ``+/+/+/+/+/+/features/{birth,data,death}``. For every device whose asset
type (``plant.devices[].asset``, or ``services.inference.devices``) has a model under
``models_dir/<asset>/<kind>/current``, it gathers each window's features and, once per
window with every feature a model needs (`uns_inference.combine`), runs the model in a
thread and publishes
``{device}/scores/data`` (with the window it scored and the model's name, version and
sha256) and, through the hysteresis of `uns_inference.events`, one
``{device}/events/anomaly`` raised/cleared pair per fault (QoS 1).

Models are checked (sha256, Ed25519 signature) before they are loaded; the models
directory is polled every ``reload_s`` and a promoted model replaces the serving one
without a restart; a refused one leaves the previous one serving. Every load and
refusal is a line of the keyed (HMAC-chained, anchored) audit log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from uns import (
    Command,
    ConfigError,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    DevicePath,
    Event,
    Inbound,
    Metric,
    MetricDef,
    ModelRef,
    Node,
    Service,
    node_topic,
    now_ms,
)
from uns.errors import Reject, TopicError, UnsError
from uns.payloads import SEQ_MODULUS, Quality
from uns.topics import device_filter
from uns_inference import audit, onnxmodel, signing
from uns_inference import card as cards
from uns_inference import events as eventstate
from uns_inference.card import KINDS, Card, CardError, Kind
from uns_inference.combine import DeviceFeatures, NotReady
from uns_inference.events import EventState, Hysteresis, OpenEvent, Transition
from uns_inference.onnxmodel import ModelError, OnnxModel
from uns_inference.settings import InferenceSettings
from uns_inference.signing import CARD_FILE, MODEL_FILE, SIG_FILE, IntegrityError, SignatureError

log = logging.getLogger(__name__)

CURRENT: Final = "current"
TOP_FEATURES: Final = 3
REBIRTH_EVERY_S: Final = 30.0
"""At most one rebirth request per node in this time."""
REBIRTH_MAX_NODES: Final = 16
"""...and to at most this many nodes in it (forged node ids must not make a flood)."""

Fingerprint = tuple[str, tuple[tuple[int, int] | None, ...]]


class FeatureSetError(UnsError):
    """A model that would stop the scoring of devices the serving model scores."""


@dataclass(frozen=True)
class _Served:
    """A loaded model serving one asset type and kind."""

    model: OnnxModel
    ref: ModelRef
    features: frozenset[str]
    hysteresis: Hysteresis | None
    defs: list[MetricDef]

    @property
    def card(self) -> Card:
        return self.model.card


@dataclass
class _Device:
    path: DevicePath
    asset: str
    latest: DeviceFeatures = field(default_factory=DeviceFeatures)
    announced: set[str] | None = None
    """Feature names of its last features birth (None before one)."""
    missing: dict[Kind, list[str]] = field(default_factory=dict)
    """Features a serving model needs that the birth lacks: not scored for that kind."""
    missing_since: float | None = None
    reported: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)
    """(model sha, missing names) already logged as errors."""
    born_with: tuple[str, ...] | None = None
    """sha256 of the models its last scores birth described."""
    waiting: dict[Kind, tuple[str, ...]] = field(default_factory=dict)
    """Features a model's windows lacked when they were given up (logged once, until a
    complete window is scored again)."""
    events: EventState = field(default_factory=EventState)
    event_id: str = ""
    event_top: str = ""
    node: str | None = None
    """The node whose features birth announced the device (None before one): only its
    data and deaths are trusted."""
    bdseq: int = 0
    """The birth/death sequence of that birth: an older session's death is stale."""


def _fingerprint(directory: Path, version: str) -> Fingerprint:
    stats: list[tuple[int, int] | None] = []
    for name in (MODEL_FILE, CARD_FILE, SIG_FILE):
        try:
            st = (directory / name).stat()
            stats.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append(None)
    return version, tuple(stats)


def _scan(models_dir: Path, assets: set[str]) -> dict[tuple[str, Kind], tuple[Path, Fingerprint]]:
    """The version each slot's ``current`` names, with a fingerprint of its files. Blocking."""
    found: dict[tuple[str, Kind], tuple[Path, Fingerprint]] = {}
    for asset in sorted(assets):
        for kind in KINDS:
            slot = models_dir / asset / kind
            try:
                version = (slot / CURRENT).read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if not version or "/" in version or version.startswith("."):
                continue
            found[(asset, kind)] = (slot / version, _fingerprint(slot / version, version))
    return found


def _peek(directory: Path) -> tuple[str, str, str]:
    """Name, version and sha256 for the audit line of a refused model (what can be read)."""
    name = f"{directory.parent.parent.name}/{directory.parent.name}"
    version = directory.name
    sha = ""
    try:
        sha = signing.sha256_file(directory / MODEL_FILE)
    except OSError:
        pass  # missing: the refusal's reason says so
    try:
        c = cards.read(directory / CARD_FILE)
        name, version = c.name, c.version
    except CardError:
        pass  # unreadable: the refusal's reason says so
    return name, version, sha


def _metric_defs(card: Card, ref: ModelRef) -> list[MetricDef]:
    source = f"model:{ref.name}@{ref.version} sha256:{ref.sha256[:12]}"
    if card.kind == "anomaly":
        return [
            MetricDef(
                name="anomaly_score",
                datatype="double",
                unit="1",
                low=0.0,
                description="Anomaly score of the features: about 1 when healthy,"
                " a breach from anomaly_threshold",
                source=source,
            ),
            MetricDef(
                name="anomaly_threshold",
                datatype="double",
                unit="1",
                low=0.0,
                description="Score from which a window breaches (events raise after"
                f" {card.thresholds.min_raise_s if card.thresholds else 0:g} s of breaches)",
                source=source,
            ),
            *(
                MetricDef(
                    name=f"contribution.{f}",
                    datatype="double",
                    unit="1",
                    low=0.0,
                    description=f"Part of anomaly_score due to {f}",
                    source=source,
                )
                for f in card.features
            ),
        ]
    unit, cap = card.rul_unit, card.rul_cap
    return [
        MetricDef(
            name=name,
            datatype="double",
            unit=unit,
            low=0.0,
            high=cap,
            description=description,
            source=source,
        )
        for name, description in (
            ("rul", f"Remaining useful life (at most {cap:g} {unit})"),
            ("rul_lower", "Lower bound of rul (5th percentile of validation errors)"),
            ("rul_upper", "Upper bound of rul (95th percentile of validation errors)"),
        )
    ]


class Inference(Service[InferenceSettings]):
    name = "inference"
    shard_by_device = True
    Settings = InferenceSettings

    def __init__(self, node: Node[InferenceSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.assets: dict[str, str] = {d.path: d.asset for d in node.config.plant.devices}
        self.assets.update(s.devices)
        self.models_dir = Path(s.models_dir)
        self.audit_path = Path(s.audit_log)
        self.state_path = (
            Path(s.state_file)
            if s.state_file
            # replicas keep their open events apart: each its own file
            else self.audit_path.parent
            / ("inference-events.json" if node.shard is None else f"{node.id}-events.json")
        )
        self._state_lock = asyncio.Lock()
        self._state_dirty = False
        self.max_age_ms = round(s.max_feature_age_s * 1000)
        self.pubkey: Ed25519PublicKey | None = None
        if s.pubkey:
            try:
                self.pubkey = signing.load_public_key(Path(s.pubkey))
            except IntegrityError as exc:
                raise ConfigError(f"services.inference.pubkey: {exc}") from None
        self.served: dict[tuple[str, Kind], _Served] = {}
        self.seen: dict[tuple[str, Kind], Fingerprint] = {}
        self.devices: dict[DevicePath, _Device] = {}
        self._announced_missing_dir = False
        self._rebirths_asked: dict[str, float] = {}
        node.subscribe(
            device_filter(stream="features", message="birth"), DeviceBirth, self.on_birth
        )
        node.subscribe(device_filter(stream="features", message="data"), DeviceData, self.on_data)
        node.subscribe(
            device_filter(stream="features", message="death"), DeviceDeath, self.on_death
        )
        m = node.metrics
        self.m_scores = m.counter(
            "uns_inference_scores_total", "Score messages published", ["kind"], zeros=KINDS
        )
        self.m_events = m.counter(
            "uns_inference_events_total",
            "Anomaly events published",
            ["state"],
            zeros=("raised", "cleared"),
        )
        self.m_refused = m.counter(
            "uns_inference_models_refused_total",
            "Models refused (integrity, signature, card, graph or features)",
            ["reason"],
            zeros=("integrity", "signature", "card", "graph", "features"),
        )
        self.m_skipped = m.counter(
            "uns_inference_rows_skipped_total",
            "Features a model could not score (missing: the birth lacks some; incomplete:"
            " a window given up without all of them)",
            ["reason"],
        )
        self.m_latency = m.histogram(
            "uns_inference_latency_seconds",
            "Features message received to its scores published",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        ).labels()
        self.m_info = m.gauge(
            "uns_inference_model_info",
            "1 for each model serving an asset type",
            ["asset", "name", "version"],
        )
        self.m_audit_lines = m.gauge(
            "uns_inference_audit_lines",
            "Lines of the model audit log (it only grows: a drop means it was cut)",
        )
        self.m_audit_key = m.gauge(
            "uns_inference_audit_key_info",
            "1 for the id of the key the model audit log is chained under",
            ["key"],
        )
        # For the dashboard (deploy/grafana): a plant has tens of devices, not thousands.
        self.m_anomaly = m.gauge(
            "uns_inference_anomaly_score",
            "The latest anomaly score of each device (as published on its scores stream)",
            ["device"],
        )
        self.m_threshold = m.gauge(
            "uns_inference_anomaly_threshold",
            "The score above which each device's anomaly event is raised",
            ["device"],
        )
        m.gauge("uns_inference_open_events", "Anomaly events open now").labels().set_function(
            lambda: sum(1 for d in self.devices.values() if d.events.is_open)
        )
        self._audit_key = ""
        self._restore_events()

    # ---- models ---------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        if s.allow_unsigned:
            log.warning("allow_unsigned is set: models load without a signature (development only)")
        elif self.pubkey is None:
            log.warning(
                "no pubkey configured (services.inference.pubkey): every model will be refused"
            )
        self._audit_head(await asyncio.to_thread(audit.head, self.audit_path))
        try:
            while True:
                await self.check_models()
                self._report_missing(time.monotonic())
                if self._state_dirty:
                    await self._save_events()
                await asyncio.sleep(s.reload_s)
        finally:
            if self._state_dirty:  # stopping: a peak or count of the last seconds
                self._write_events(self._open_events())

    async def check_models(self) -> None:
        """Load what ``current`` names where it changed since the last look."""
        assets = set(self.assets.values())
        found = await asyncio.to_thread(_scan, self.models_dir, assets)
        if not found and not self.served and not self._announced_missing_dir:
            self._announced_missing_dir = True
            log.info(
                "no models under %s for %s yet (promote one with `uns model promote`)",
                self.models_dir.resolve(),
                ", ".join(sorted(assets)) or "no asset (plant.devices is empty)",
            )
        for slot, (directory, fingerprint) in found.items():
            if self.seen.get(slot) == fingerprint:
                continue
            self.seen[slot] = fingerprint
            await self._load(slot, directory)

    async def _load(self, slot: tuple[str, Kind], directory: Path) -> None:
        asset, kind = slot
        s = self.settings
        try:
            model = await asyncio.to_thread(
                onnxmodel.load, directory, self.pubkey, allow_unsigned=s.allow_unsigned
            )
            card = model.card
            if (card.asset, card.kind) != slot:
                raise CardError(
                    f"the card is for {card.asset}/{card.kind}, promoted under {asset}/{kind}"
                )
            old = self.served.get(slot)
            if old is not None:
                self._check_feature_set(slot, old, card)
        except (IntegrityError, CardError, ModelError, FeatureSetError) as exc:
            await self._refuse(slot, directory, exc)
            return
        ref = ModelRef(name=card.name, version=card.version, sha256=model.sha256)
        self.served[slot] = _Served(
            model, ref, frozenset(card.features), self._hysteresis(card), _metric_defs(card, ref)
        )
        if old is not None:
            self.m_info.remove(asset, old.ref.name, old.ref.version)
        self.m_info.labels(asset, ref.name, ref.version).set(1)
        await self._audit("load", ref.name, ref.version, ref.sha256, str(directory))
        log.info(
            "%s/%s: serving %s %s (sha256 %s, %s)%s",
            asset,
            kind,
            ref.name,
            ref.version,
            ref.sha256[:12],
            "signed" if model.verified.signed else "UNSIGNED",
            f", replacing {old.ref.version}" if old is not None else "",
        )
        for text, device_asset in self.assets.items():
            if device_asset != asset:
                continue
            path = DevicePath.parse(text)
            if not self.node.owns(path):
                continue  # another replica's: its first data here (a failover) births it
            device = self._device_at(path)
            if device is not None:
                self._check_features(device)
                await self._ensure_birth(device)  # its scores stream now exists (or changed)

    def _check_feature_set(self, slot: tuple[str, Kind], old: _Served, card: Card) -> None:
        """A replacement must score every device the serving model scores: a model trained
        on other features than the devices announce would silently end their scoring."""
        lost = []
        for device in self.devices.values():
            if device.asset != slot[0] or device.announced is None:
                continue
            if not old.features <= device.announced:
                continue  # not scored today either
            missing = [f for f in card.features if f not in device.announced]
            if missing:
                lost.append(f"{device.path} lacks {', '.join(missing)}")
        if lost:
            raise FeatureSetError(
                "needs features the devices it would score do not announce ("
                + "; ".join(lost)
                + "); promote it again once they do"
            )

    async def _refuse(self, slot: tuple[str, Kind], directory: Path, exc: UnsError) -> None:
        reason = (
            "features"
            if isinstance(exc, FeatureSetError)
            else "card"
            if isinstance(exc, CardError)
            else "graph"
            if isinstance(exc, ModelError)
            else "signature"
            if isinstance(exc, SignatureError)
            else "integrity"
        )
        self.m_refused.labels(reason).inc()
        name, version, sha = await asyncio.to_thread(_peek, directory)
        await self._audit("refuse", name, version, sha, str(exc))
        current = self.served.get(slot)
        log.error(
            "%s/%s: model %s refused: %s; %s",
            slot[0],
            slot[1],
            directory,
            exc,
            f"{current.ref.name} {current.ref.version} keeps serving"
            if current
            else "no model serves it",
        )

    async def _audit(
        self, event: audit.AuditEvent, name: str, version: str, sha: str, reason: str
    ) -> None:
        try:
            head = await asyncio.to_thread(
                audit.append,
                self.audit_path,
                event,
                ts=now_ms(),
                model=name,
                version=version,
                sha256=sha,
                reason=reason if event == "refuse" else "",
            )
        except OSError as exc:
            log.error(
                "audit log %s: cannot append (%s): %s %s %s",
                self.audit_path,
                exc,
                event,
                name,
                version,
            )
            return
        self._audit_head(head)
        log.info(
            "audit %s: line %d %s %s %s, head %s mac %s key %s",
            self.audit_path,
            head.lines,
            event,
            name,
            version,
            head.sha256[:16],
            head.mac[:16],
            head.key,
        )

    def _audit_head(self, head: audit.Head) -> None:
        """Export the head, so a scraper off the box keeps a copy: a log cut short or
        re-keyed shows as the line count going down or a new key id."""
        self.m_audit_lines.labels().set(head.lines)
        if head.key and head.key != self._audit_key:
            if self._audit_key:
                self.m_audit_key.remove(self._audit_key)
            self._audit_key = head.key
            self.m_audit_key.labels(head.key).set(1)

    # ---- open events across restarts ------------------------------------------------------

    def _restore_events(self) -> None:
        """Read the open events of the last run (once, before anything connects)."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot read open events (%s): starting without", self.state_path, exc)
            return
        try:
            saved = eventstate.decode_open(data)
        except ValueError as exc:
            log.error("%s: not a state file (%s): starting without", self.state_path, exc)
            return
        for event in saved:
            try:
                path = DevicePath.parse(event.device)
            except TopicError:
                path = None
            device = self._device_at(path) if path is not None else None
            if device is None or event.kind != "anomaly":
                log.warning(
                    "%s: open event %s of %s dropped: the device is not configured any more",
                    self.state_path,
                    event.id,
                    event.device,
                )
                self._state_dirty = True
                continue
            device.events.reopen(event)
            device.event_id, device.event_top = event.id, event.top
            log.info(
                "%s: anomaly %s still open from before the restart (count %d, peak %.3g):"
                " it goes on under the same id",
                device.path,
                event.id,
                event.count,
                event.peak,
            )

    def _open_events(self) -> list[OpenEvent]:
        return [
            OpenEvent.of(str(d.path), "anomaly", d.event_id, d.event_top, d.events)
            for d in self.devices.values()
            if d.events.is_open
        ]

    def _write_events(self, events: list[OpenEvent]) -> bool:
        """Replace the state file atomically (write, fsync, rename). Blocking."""
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            staged = self.state_path.with_name(f".{self.state_path.name}.tmp")
            with staged.open("wb") as f:
                f.write(eventstate.encode_open(events))
                f.flush()
                os.fsync(f.fileno())
            os.replace(staged, self.state_path)
        except OSError as exc:
            log.error(
                "%s: cannot save the open events (%s): a restart would raise them again",
                self.state_path,
                exc,
            )
            return False
        return True

    async def _save_events(self) -> None:
        self._state_dirty = False
        events = self._open_events()  # taken now, on the loop; written in a thread, in order
        async with self._state_lock:
            if not await asyncio.to_thread(self._write_events, events):
                self._state_dirty = True  # tried again on the next round

    def _hysteresis(self, card: Card) -> Hysteresis | None:
        t = card.thresholds
        if t is None:
            return None
        o = self.settings.thresholds
        raise_ = o.raise_ if o.raise_ is not None else t.raise_
        scale = raise_ / t.raise_ if t.raise_ > 0 else 1.0
        return Hysteresis.of(
            raise_,
            o.clear if o.clear is not None else t.clear * scale,
            o.min_raise_s if o.min_raise_s is not None else t.min_raise_s,
            o.min_clear_s if o.min_clear_s is not None else t.min_clear_s,
            t.critical * scale,
        )

    # ---- devices ----------------------------------------------------------------------

    def _device(self, topic: str) -> _Device | None:
        try:
            path = DevicePath.parse(topic.rsplit("/", 2)[0])
        except TopicError:
            return None
        return self._device_at(path)

    def _device_at(self, path: DevicePath) -> _Device | None:
        device = self.devices.get(path)
        if device is None:
            asset = self.assets.get(str(path))
            if asset is None:
                return None
            device = self.devices[path] = _Device(path, asset)
        return device

    def _models(self, asset: str) -> list[tuple[Kind, _Served]]:
        return [
            (kind, self.served[(asset, kind)]) for kind in KINDS if (asset, kind) in self.served
        ]

    def _check_features(self, device: _Device) -> None:
        """Which serving models the device's birth cannot feed (logged at once or after grace)."""
        if device.announced is None:
            return
        device.missing = {}
        for kind, served in self._models(device.asset):
            missing = [f for f in served.card.features if f not in device.announced]
            if missing:
                device.missing[kind] = missing
        if not device.missing:
            device.missing_since = None
            return
        if device.missing_since is None:
            device.missing_since = time.monotonic()
        self._report_missing(time.monotonic())

    def _report_missing(self, now: float) -> None:
        grace = self.settings.announce_grace_s
        for device in self.devices.values():
            if not device.missing or device.missing_since is None:
                continue
            if now - device.missing_since < grace:
                continue
            for kind, missing in device.missing.items():
                served = self.served.get((device.asset, kind))
                if served is None:
                    continue
                key = (served.ref.sha256, tuple(missing))
                if key in device.reported:
                    continue
                device.reported.add(key)
                log.error(
                    "%s: model %s %s needs features the device does not announce: %s;"
                    " not scoring it (check the featurizer's settings or retrain on what it"
                    " publishes)",
                    device.path,
                    served.ref.name,
                    served.ref.version,
                    ", ".join(missing),
                )

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        device = self._device(msg.topic)
        if device is None:
            return
        birth = msg.payload
        if device.node is not None and birth.node != device.node:
            # Sparkplug: the newest birth wins. Still say so, since a second featurizer
            # for the same device (or a forged birth) changes whose data is trusted.
            log.warning(
                "%s: features now announced by node %s (were by %s): only its data is scored",
                device.path,
                birth.node,
                device.node,
            )
            device.latest.clear()  # values of the other node must not mix into rows
        elif device.node is not None and device.announced is None:
            log.info(
                "%s: features announced again by node %s: scoring resumes", device.path, birth.node
            )
        device.node, device.bdseq = birth.node, birth.bdseq
        device.announced = {m.name for m in birth.metrics}
        self._check_features(device)

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        device = self._device(msg.topic)
        if device is None:
            return
        death = msg.payload
        if device.node is None or device.announced is None:
            return  # nothing is scored: e.g. a retained death of a device dead before we started
        if death.node != device.node:
            raise Reject(
                "foreign_node",
                f"{device.path}: a features death from node {death.node!r}, but node"
                f" {device.node!r} announced the device; still scoring it",
            )
        if (death.bdseq - device.bdseq) % SEQ_MODULUS >= SEQ_MODULUS // 2:
            raise Reject(
                "stale_death",
                f"{device.path}: a features death of session {death.bdseq}, older than the"
                f" birth's {device.bdseq}; still scoring it",
            )
        log.warning(
            "%s: features stream died (node %s: %s): not scoring it until it is announced again",
            device.path,
            death.node,
            death.reason or "no reason given",
        )
        device.latest.clear()
        device.announced = None
        device.waiting.clear()
        if device.born_with is not None:
            device.born_with = None
            await self.node.device_death(device.path, "scores", reason="features stream died")

    async def _untrusted_data(self, device: _Device, data: DeviceData) -> None:
        """Data from a node that has not announced the device: dropped (Sparkplug: data
        before birth is not trusted), and the node asked for a rebirth, since a birth it
        published may have been lost (rate-limited: a flood of forged data stays cheap)."""
        await self._ask_rebirth(device.path, data.node)
        if device.node is not None and data.node != device.node:
            raise Reject(
                "foreign_node",
                f"{device.path}: features from node {data.node!r}, but node {device.node!r}"
                " announced the device",
            )
        raise Reject(
            "unannounced",
            f"{device.path}: features from node {data.node!r} before its features birth"
            " (a rebirth was asked for)",
        )

    async def _ask_rebirth(self, path: DevicePath, node_id: str) -> None:
        now = time.monotonic()
        asked = self._rebirths_asked
        for old in [n for n, at in asked.items() if now - at >= REBIRTH_EVERY_S]:
            del asked[old]
        if node_id in asked or len(asked) >= REBIRTH_MAX_NODES:
            return
        try:
            topic = node_topic(path.enterprise, path.site, node_id, "cmd")
        except TopicError:
            return  # not a node id at all: nobody to ask
        asked[node_id] = now
        command = Command(
            ts=now_ms(), name="rebirth", id=uuid.uuid4().hex[:12], sender=self.node.id
        )
        await self.node.publish(topic, command, qos=1)
        log.info("%s: asked node %s for a rebirth (its data came without a birth)", path, node_id)

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        received = time.perf_counter()
        device = self._device(msg.topic)
        if device is None:
            return
        data = msg.payload
        if device.announced is None or data.node != device.node:
            await self._untrusted_data(device, data)
        at = data.window.end if data.window is not None else data.ts
        updated = device.latest.update(data.metrics, at, data.window)
        models = self._models(device.asset)
        scored = False
        for kind, served in models:
            if not updated & served.features:
                continue
            if kind in device.missing:
                self.m_skipped.labels("missing").inc()
                continue
            row = device.latest.offer(kind, served.card.features, at)
            if row is None or isinstance(row, NotReady):
                continue  # scored already, or waiting for the rest of its window
            if device.waiting.pop(kind, None) is not None:
                log.info("%s: scoring with %s again", device.path, served.ref.name)
            x = row.values.astype(np.float32)[None, :]
            outputs = await asyncio.to_thread(served.model.run, x)
            await self._ensure_birth(device)
            quality: Quality = "uncertain" if row.uncertain else "good"
            reason = "input_uncertain" if row.uncertain else None
            if kind == "anomaly":
                score = float(outputs["score"][0])
                contributions = outputs["contributions"][0]
                h = served.hysteresis
                assert h is not None
                self.m_anomaly.labels(str(device.path)).set(score)
                self.m_threshold.labels(str(device.path)).set(h.raise_)
                values = [
                    ("anomaly_score", score),
                    ("anomaly_threshold", h.raise_),
                    *(
                        (f"contribution.{f}", float(c))
                        for f, c in zip(served.card.features, contributions, strict=True)
                    ),
                ]
            else:
                values = [(o, float(outputs[o][0])) for o in ("rul", "rul_lower", "rul_upper")]
            metrics = [
                Metric(name=n, value=round(v, 6), quality=quality, reason=reason) for n, v in values
            ]
            await self.node.device_data(
                device.path, "scores", metrics, window=row.window, model=served.ref
            )
            self.m_scores.labels(kind).inc()
            scored = True
            if kind == "anomaly":
                await self._event(device, served, at, score, contributions)
        if scored:
            self.m_latency.observe(time.perf_counter() - received)
        given = device.latest.expire(
            at, self.max_age_ms, {kind: served.card.features for kind, served in models}
        )
        for key, gone in given:
            self.m_skipped.labels("incomplete").inc()
            for kind, served in models:
                if kind != key or kind in device.waiting:
                    continue
                device.waiting[kind] = tuple(gone.missing)
                log.warning(
                    "%s: not scoring with %s the windows that lack some of its features (the"
                    " window ending %d lacked %s; a window waits at most %g s of data time);"
                    " scoring resumes with the next complete window",
                    device.path,
                    served.ref.name,
                    gone.end,
                    ", ".join(gone.missing) or "none: they came after a later window",
                    self.settings.max_feature_age_s,
                )

    async def _ensure_birth(self, device: _Device) -> None:
        models = self._models(device.asset)
        shas = tuple(served.ref.sha256 for _, served in models)
        if device.born_with == shas:
            return
        device.born_with = shas
        defs = [d for _, served in models for d in served.defs]
        await self.node.device_birth(device.path, "scores", defs)

    async def _event(
        self,
        device: _Device,
        served: _Served,
        at: int,
        score: float,
        contributions: np.ndarray,  # type: ignore[type-arg]
    ) -> None:
        h = served.hysteresis
        assert h is not None
        state = device.events
        before = (state.count, state.peak) if state.is_open else None
        t = state.update(at, score, h)
        if t is None:
            if before is not None and before != (state.count, state.peak):
                self._state_dirty = True  # saved within reload_s, and at a clean stop
            return
        if t.state == "raised":
            device.event_id = f"{device.path.device}-anomaly-{t.started}-{uuid.uuid4().hex[:8]}"
            order = np.argsort(-contributions, kind="stable")[:TOP_FEATURES]
            device.event_top = ",".join(served.card.features[i] for i in order)
            # saved before it is published: a restart after consumers saw it goes on with it
            await self._save_events()
            await self._publish_event(device, served, t, h)
        else:
            # queued before it is forgotten: a restart in between clears it again (same id)
            await self._publish_event(device, served, t, h)
            await self._save_events()

    async def _publish_event(
        self, device: _Device, served: _Served, t: Transition, h: Hysteresis
    ) -> None:
        top = device.event_top
        if t.state == "raised":
            summary = (
                f"Anomaly on {device.path.device}: score {t.score:.3g} above {h.raise_:.3g}"
                f" for {(t.ts - t.started) / 1000:g} s ({top.replace(',', ', ')})"
            )
        else:
            summary = (
                f"Anomaly on {device.path.device} cleared after {(t.ts - t.started) / 1000:g} s:"
                f" peak {t.peak:.3g}, {t.count} breach{'es' if t.count != 1 else ''}"
            )
        event = Event(
            ts=now_ms(),
            data_ts=t.ts,
            id=device.event_id,
            kind="anomaly",
            state=t.state,
            device=str(device.path),
            started=t.started,
            severity=t.severity,
            summary=summary,
            score=round(t.score, 6),
            threshold=h.raise_,
            count=t.count,
            details={
                "model": served.ref.name,
                "model_version": served.ref.version,
                "top_features": top,
            },
        )
        await self.node.publish(device.path.topic("events", "anomaly"), event, qos=1)
        self.m_events.labels(t.state).inc()
        log.info("%s: anomaly %s (%s), score %.3g", device.path, t.state, event.id, t.score)
