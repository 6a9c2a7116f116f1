from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText, PositiveFloat, Slug, Strict, UnsConfig
from uns.scope import Scope

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class ThresholdOverrides(Strict, frozen=True):
    """Replace the model card's event thresholds (all models); absent = the card's."""

    raise_: PositiveFloat | None = msgspec.field(default=None, name="raise")
    clear: NonNegative | None = None
    min_raise_s: NonNegative | None = None
    min_clear_s: NonNegative | None = None


class InferenceSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9406

    models_dir: str = "models"
    """``<asset>/<kind>/current`` names the version directory (``model.onnx``,
    ``card.json``, ``model.onnx.sig``) serving that asset type; relative to the working
    directory."""
    pubkey: str | None = None
    """Ed25519 public key (PEM) that must have signed every model. Without it every
    model is refused, unless ``allow_unsigned``."""
    allow_unsigned: bool = False
    """Development only: load models without a signature check (sha256 still checked)."""
    audit_log: str = "var/model-audit.jsonl"
    """Append-only, HMAC-chained log of loads, promotions and refusals; its key
    (``<audit_log>.key``, created on first use) and anchor (``.anchor``) beside it."""
    state_file: str | None = None
    """Open anomaly events, so a restart goes on with the same ids (and clears them)
    instead of raising them again; ``inference-events.json`` next to ``audit_log`` when
    absent (one volume keeps both), ``{node_id}-events.json`` for a replica (``replicas``)."""
    reload_s: PositiveFloat = 2.0
    """How often the models directory is checked for promotions."""
    max_feature_age_s: PositiveFloat = 120.0
    """How long (data time) a window waits for the rest of its features: a device is scored
    only on windows with every feature a model needs (uns-schema/README.md); one still
    lacking some this long after its end is given up, unscored
    (``uns_inference_rows_skipped_total{reason="incomplete"}``)."""
    announce_grace_s: NonNegative = 120.0
    """Seconds a device's features birth may lack features a model needs before that is
    logged as an error (a featurizer announces slow-tag features only after their first
    window)."""
    thresholds: ThresholdOverrides = ThresholdOverrides()
    devices: dict[DevicePathText, Slug] = {}
    """Device path -> asset type for devices outside ``plant.devices`` (e.g. replayed
    recordings); ``plant.devices[].asset`` covers the rest."""

    def scope(self, config: UnsConfig) -> Scope:
        """Reads every device's features; publishes this site's scores and anomaly events,
        and asks a node of this site for a rebirth (its features came without a birth)."""
        site = f"{config.namespace.enterprise}/{config.namespace.site}"
        return Scope(
            publish=(
                f"{site}/+/+/+/+/scores/+",
                f"{site}/+/+/+/+/events/anomaly",
                f"{site}/_node/+/cmd",
            ),
            subscribe=tuple(f"+/+/+/+/+/+/features/{m}" for m in ("birth", "data", "death")),
        )
