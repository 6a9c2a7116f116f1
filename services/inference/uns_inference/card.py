"""The model card: what a model is, what it needs, how it was made and how good it is.

``card.json`` sits beside ``model.onnx`` and is covered by the same signature. The
inference service takes the feature order, the thresholds and the output names from
it; people read the method, the training data and the evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from uns.errors import UnsError

CARD_FORMAT: Final = 1
Kind = Literal["anomaly", "rul"]
KINDS: Final = ("anomaly", "rul")
Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}(?!\n)$")]
Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}(?!\n)$")]
"""A version is a directory name under ``models/<asset>/<kind>/``: no slashes, no dots first."""


class CardError(UnsError):
    """A card that does not decode or does not fit its model."""


class _Part(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    pass


class Normalisation(_Part, frozen=True, kw_only=True):
    """Feature j is transformed ``x -> log(max(x, 0) + offsets[j])`` if ``log[j]``, then
    standardised ``(x - means[j]) / stds[j]`` (all inside the ONNX graph)."""

    means: list[float]
    stds: list[float]
    log: list[bool]
    offsets: list[float]


class Thresholds(_Part, frozen=True, kw_only=True):
    """Hysteresis of the anomaly events (durations in data time: the windows' end times)."""

    raise_: float = msgspec.field(name="raise")
    """Score at or above which a window breaches."""
    clear: float
    """Score below which a window is healthy again (below ``raise``)."""
    min_raise_s: float
    """Seconds a breach must last before an event is raised."""
    min_clear_s: float
    """Seconds below ``clear`` before an open event is cleared."""
    critical: float
    """Score from which a raised event's severity is ``critical`` (else ``warning``)."""


class Training(_Part, frozen=True, kw_only=True):
    rows: int
    data_sha256: str
    """sha256 of the recording file(s) (of their digests, in order, for several)."""
    created: str
    """UTC, ISO 8601."""
    files: list[str] = []
    devices: list[str] = []
    parameters: dict[str, Any] = {}
    """What the fit was given (variance kept, quantile, margin, ridge alpha, ...)."""


class Card(_Part, frozen=True, kw_only=True):
    format: int = CARD_FORMAT
    name: Slug
    version: Version
    kind: Kind
    asset: Slug
    method: str
    """What the model computes and why this method (free text)."""
    features: list[str]
    """Input columns, in order: feature metric names as the featurizer publishes them."""
    outputs: list[str]
    """ONNX output names: score + contributions (anomaly), rul (+ rul_lower, rul_upper)."""
    normalisation: Normalisation
    thresholds: Thresholds | None = None
    """Anomaly models only."""
    rul_unit: str = ""
    """RUL models: the unit of ``rul`` (``h``, ``min``, ``s``)."""
    rul_cap: float | None = None
    """RUL models: predictions are clipped to ``[0, rul_cap]`` (the target was too)."""
    training: Training
    evaluation: dict[str, Any] = {}
    sha256: str
    """sha256 of ``model.onnx``: binds the card to its graph."""

    def __post_init__(self) -> None:
        n = len(self.features)
        if n == 0:
            raise ValueError("features: a model needs at least one")
        if len(set(self.features)) != n:
            raise ValueError("features: duplicated names")
        norm = self.normalisation
        for field in ("means", "stds", "log", "offsets"):
            if len(getattr(norm, field)) != n:
                raise ValueError(f"normalisation.{field}: expected {n} values, one per feature")
        if self.kind == "anomaly" and self.thresholds is None:
            raise ValueError("thresholds: an anomaly model needs them")
        t = self.thresholds
        if t is not None and not 0 <= t.clear <= t.raise_:
            raise ValueError("thresholds: need 0 <= clear <= raise")


_encoder = msgspec.json.Encoder()


def encode(card: Card) -> bytes:
    """Pretty, stable JSON (field order of the struct), newline-terminated."""
    return msgspec.json.format(_encoder.encode(card), indent=2) + b"\n"


def decode(data: bytes, where: str = "card.json") -> Card:
    try:
        return msgspec.json.decode(data, type=Card)
    except msgspec.ValidationError as exc:
        raise CardError(f"{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise CardError(f"{where}: not a model card: {exc}") from None


def read(path: Path) -> Card:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardError(f"{path}: {exc.strerror or exc}") from None
    return decode(data, str(path))


def write(path: Path, card: Card) -> None:
    path.write_bytes(encode(card))
