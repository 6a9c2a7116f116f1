"""The payload contract: typed JSON messages with Sparkplug B semantics.

Every message is a frozen msgspec ``Struct`` whose type travels as the tag
``"type"`` and whose schema version travels as ``"v"``. Decoding checks every
type and reports the path of the first error (``at $.metrics[3].value``).

Schema evolution (written down in ``uns-schema/README.md`` too):

1. a new field always has a default, so old messages still decode;
2. unknown fields are ignored, so old consumers read new messages;
3. a field never changes its type or meaning; a breaking change gets a new tag.
"""

from __future__ import annotations

import array
import functools
import sys
import time
from collections.abc import Iterable
from typing import Any, Final, Literal, TypeVar

import msgspec

from uns.errors import PayloadError

SCHEMA_VERSION: Final = 1
SEQ_MODULUS: Final = 256

Quality = Literal["good", "uncertain", "bad"]
DataType = Literal[
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float",
    "double",
    "string",
    "waveform",
]
SampleType = Literal["f32", "f64", "i16"]
_TYPECODES: Final[dict[str, str]] = {"f32": "f", "f64": "d", "i16": "h"}


def now_ms() -> int:
    """Milliseconds since the Unix epoch: the unit of every ``ts`` field."""
    return time.time_ns() // 1_000_000


def next_seq(seq: int) -> int:
    """The sequence number after ``seq`` (0..255, wrapping)."""
    return (seq + 1) % SEQ_MODULUS


class Waveform(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """One block of a high-rate signal: one message per block, never one per sample.

    ``samples`` are little-endian numbers of ``dtype`` (base64 in JSON), so a
    1,000-sample float32 block costs about 5.5 kB instead of ~20 kB of decimals.
    """

    t0_us: int
    """Time of the first sample, microseconds since the Unix epoch."""
    rate_hz: float
    """Sample rate; sample ``i`` was taken at ``t0_us + i * 1e6 / rate_hz``."""
    samples: bytes
    dtype: SampleType = "f32"
    scale: float = 1.0
    """Engineering value = stored value * scale (lets i16 carry a calibrated signal)."""
    block: int = 0
    """Block counter of this signal, so a consumer sees a missing or reordered block."""

    @classmethod
    def from_values(
        cls,
        values: Iterable[float],
        *,
        t0_us: int,
        rate_hz: float,
        dtype: SampleType = "f32",
        scale: float = 1.0,
        block: int = 0,
    ) -> Waveform:
        """Pack numbers (a list, array or numpy array) into a block."""
        if hasattr(values, "astype"):  # numpy, without importing it here
            dt = {"f32": "<f4", "f64": "<f8", "i16": "<i2"}[dtype]
            raw = values.astype(dt).tobytes()  # type: ignore[attr-defined]
        else:
            packed = array.array(_TYPECODES[dtype], values)
            if sys.byteorder == "big":
                packed.byteswap()
            raw = packed.tobytes()
        return cls(t0_us=t0_us, rate_hz=rate_hz, samples=raw, dtype=dtype, scale=scale, block=block)

    def __len__(self) -> int:
        return len(self.samples) // array.array(_TYPECODES[self.dtype]).itemsize

    def values(self) -> list[float]:
        """The samples in engineering units (use numpy.frombuffer for speed)."""
        packed = array.array(_TYPECODES[self.dtype])
        packed.frombytes(self.samples)
        if sys.byteorder == "big":
            packed.byteswap()
        if self.scale == 1.0:
            return [float(x) for x in packed]
        return [x * self.scale for x in packed]


MetricValue = bool | int | float | str | Waveform | None


class MetricDef(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """What a birth says of one metric, once, so data messages stay small."""

    name: str
    datatype: DataType
    alias: int | None = None
    unit: str = ""
    """SI / UCUM-style symbol: degC, bar, A, mm/s, g, kN, rpm, 1 (dimensionless)."""
    low: float | None = None
    """Engineering range, low end."""
    high: float | None = None
    """Engineering range, high end."""
    description: str = ""
    source: str = ""
    """Where the value comes from: an OPC UA NodeId, a Modbus address, a feature formula."""
    rate_hz: float | None = None
    """Sample rate of a waveform metric."""


class Metric(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """One value in a data message. Quality is OPC UA style; ``reason`` says why it is not good."""

    name: str
    value: MetricValue
    ts: int | None = None
    """Source timestamp (ms since epoch); absent means the message's ``ts``."""
    quality: Quality = "good"
    reason: str | None = None
    """E.g. ``BadCommunicationError``, ``ModbusException:2``, ``stale``."""
    alias: int | None = None


class Window(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Provenance of a derived message: which raw data it was computed from."""

    start: int
    """Time of the window's first sample (ms since epoch)."""
    end: int
    """Time just after its last sample (ms since epoch)."""
    good: int
    """Samples that went into the result."""
    total: int
    """Samples seen in the window, good or not (bad quality, NaN, duplicated, out of order)."""
    seq_first: int | None = None
    """``seq`` of the first and last source messages (0..255, wrapping)."""
    seq_last: int | None = None
    node: str = ""
    """The node that published the source data."""


class ModelRef(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Which model produced a score."""

    name: str
    version: str
    sha256: str


class _Envelope(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False
):
    v: int = SCHEMA_VERSION
    ts: int
    """When the message was created (ms since epoch)."""


class NodeBirth(_Envelope, tag="nbirth", kw_only=True, frozen=True):
    """A service instance (edge node) is online; retained at ``{ent}/{site}/_node/{node}/birth``."""

    node: str
    service: str
    version: str = ""
    bdseq: int
    """Birth/death sequence: the matching death carries the same number."""
    seq: int = 0
    host: str = ""
    metrics_url: str = ""
    """Where its Prometheus metrics are served, if anywhere."""
    metrics: list[MetricDef] = []


class NodeDeath(_Envelope, tag="ndeath", kw_only=True, frozen=True):
    """The node went away: its MQTT Last Will (``reason="lost"``) or a clean stop."""

    node: str
    bdseq: int
    reason: str = "lost"


class DeviceBirth(_Envelope, tag="dbirth", kw_only=True, frozen=True):
    """Everything about a device's metrics on one stream; retained, sent before any data."""

    node: str
    device: str
    bdseq: int
    seq: int
    metrics: list[MetricDef]


class DeviceData(_Envelope, tag="ddata", kw_only=True, frozen=True):
    """Values of the metrics that changed (report by exception) or a waveform block."""

    node: str
    seq: int
    metrics: list[Metric]
    window: Window | None = None
    """Features and scores: the raw data they were computed from."""
    model: ModelRef | None = None
    """Scores: the model that computed them."""


class DeviceDeath(_Envelope, tag="ddeath", kw_only=True, frozen=True):
    """The device is gone (the adapter lost it); its last values are stale."""

    node: str
    device: str
    bdseq: int
    seq: int
    reason: str = ""


EventState = Literal["raised", "updated", "cleared"]
Severity = Literal["info", "warning", "critical"]


class Event(_Envelope, tag="event", kw_only=True, frozen=True):
    """Something a person should know, once per occurrence (e.g. an anomaly raised/cleared)."""

    id: str
    kind: str
    state: EventState
    device: str
    started: int
    """When the condition began (ms since epoch)."""
    severity: Severity = "warning"
    summary: str = ""
    score: float | None = None
    threshold: float | None = None
    count: int = 1
    """How many breaches this open event has absorbed."""
    details: dict[str, float | str] = {}


class Command(_Envelope, tag="cmd", kw_only=True, frozen=True):
    """A request to a node or device, e.g. ``rebirth`` or ``fault``."""

    name: str
    args: dict[str, Any] = {}
    id: str = ""
    sender: str = ""


class Reply(_Envelope, tag="reply", kw_only=True, frozen=True):
    """The answer to a node command that asked for one (``args.reply_to``: a topic)."""

    id: str = ""
    """The command's id."""
    ok: bool = True
    result: dict[str, Any] = {}
    error: str = ""


Payload = NodeBirth | NodeDeath | DeviceBirth | DeviceData | DeviceDeath | Event | Command | Reply
PAYLOAD_TYPES: Final = (
    NodeBirth,
    NodeDeath,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Event,
    Command,
    Reply,
)
T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(payload: Payload) -> bytes:
    """JSON bytes of a payload."""
    return _encoder.encode(payload)


@functools.cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


def decode(data: bytes | str, kind: type[T] | Any = Payload) -> T:
    """Decode and type-check a payload; raise `PayloadError` naming where it is wrong."""
    try:
        return _decoder(kind).decode(data)  # type: ignore[no-any-return,arg-type]
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise PayloadError(str(exc)) from None


def to_builtins(payload: Payload) -> Any:
    """The payload as plain JSON-able Python objects (for ``uns sub --json``)."""
    return msgspec.to_builtins(payload)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every payload type, generated from the types above."""
    schema = msgspec.json.schema(Payload)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "UNS payload"
    schema["description"] = (
        f"Schema version {SCHEMA_VERSION}. Generated by `uns schema export`; do not edit."
    )
    return schema
