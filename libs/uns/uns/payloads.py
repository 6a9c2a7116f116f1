"""The payload contract: typed JSON messages with Sparkplug B semantics.

Every message is a frozen msgspec ``Struct`` whose type travels as the tag
``"type"`` and whose schema version travels as ``"v"``. Decoding checks every
type and reports the path of the first error (``at $.metrics[3].value``).

Schema evolution (written down in ``uns-schema/README.md`` too):

1. a new field always has a default, so old messages still decode;
2. unknown fields are ignored, so old consumers read new messages;
3. a field never changes its type or meaning; a breaking change gets a new tag.

Decoding is safe on hostile input: every failure is a `PayloadError` with the reason,
never another exception, and the limits below hold (``uns-schema/README.md`` states
them): at most `MAX_PAYLOAD_BYTES`, JSON nested at most `MAX_DEPTH` deep, at most
`MAX_ITEMS` elements in an array or object the codec builds, integers within 64 bits,
sequence numbers within 0..255.
"""

from __future__ import annotations

import array
import functools
import sys
import time
from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from uns.errors import PayloadError

SCHEMA_VERSION: Final = 1
SEQ_MODULUS: Final = 256

MAX_PAYLOAD_BYTES: Final = 1_048_576
"""Largest message decoded (1 MiB): a 1,000-sample waveform block is ~5.5 kB, a birth of
300 fully described metrics ~50 kB."""
MAX_DEPTH: Final = 32
"""Deepest nesting of JSON arrays and objects; the contract's own types nest 4 deep."""
MAX_ITEMS: Final = 10_000
"""Most elements of one array or object the codec builds (a birth's metrics, a command's
args); unknown fields are skipped, never built."""
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1
"""Integers in free-form values (``args``, ``result``): int64 to uint64."""

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=SEQ_MODULUS - 1)]
Version = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]

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

    t0_us: Int64
    """Time of the first sample, microseconds since the Unix epoch."""
    rate_hz: float
    """Sample rate; sample ``i`` was taken at ``t0_us + i * 1e6 / rate_hz``."""
    samples: bytes
    dtype: SampleType = "f32"
    scale: float = 1.0
    """Engineering value = stored value * scale (lets i16 carry a calibrated signal)."""
    block: Int64 = 0
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
    alias: Int64 | None = None
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
    ts: Int64 | None = None
    """Source timestamp (ms since epoch); absent means the message's ``ts``."""
    quality: Quality = "good"
    reason: str | None = None
    """E.g. ``BadCommunicationError``, ``ModbusException:2``, ``stale``."""
    alias: Int64 | None = None


class Window(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Provenance of a derived message: which raw data it was computed from."""

    start: Int64
    """Time of the window's first sample (ms since epoch)."""
    end: Int64
    """Time just after its last sample (ms since epoch)."""
    good: Int64
    """Samples that went into the result."""
    total: Int64
    """Samples seen in the window, good or not (bad quality, NaN, duplicated, out of order)."""
    seq_first: Seq | None = None
    """``seq`` of the first and last source messages (0..255, wrapping)."""
    seq_last: Seq | None = None
    node: str = ""
    """The node that published the source data."""


class SignalWindow(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Provenance of one signal's features in a message that carries several signals' (a
    device's slow tags): its own counts and source messages. Its window's start and end are
    the message's ``window``'s."""

    good: Int64
    """Samples of this signal that went into its features."""
    total: Int64
    """Samples of this signal seen in the window, good or not."""
    seq_first: Seq | None = None
    """``seq`` of the first and last source messages of this signal's samples."""
    seq_last: Seq | None = None


class ModelRef(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Which model produced a score."""

    name: str
    version: str
    sha256: str


class _Envelope(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False
):
    v: Version = SCHEMA_VERSION
    ts: Int64
    """When the message was created (ms since epoch)."""


class NodeBirth(_Envelope, tag="nbirth", kw_only=True, frozen=True):
    """A service instance (edge node) is online; retained at ``{ent}/{site}/_node/{node}/birth``."""

    node: str
    service: str
    version: str = ""
    bdseq: Seq
    """Birth/death sequence: the matching death carries the same number."""
    seq: Seq = 0
    host: str = ""
    metrics_url: str = ""
    """Where its Prometheus metrics are served, if anywhere."""
    metrics: Annotated[list[MetricDef], msgspec.Meta(max_length=MAX_ITEMS)] = []
    relays: Annotated[list[str], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Namespace prefixes (``{ent}/{site}``) this node relays to the broker its birth is on:
    a bridge's birth at the central broker. While such a node is offline there, every
    other node of those prefixes is too (its box is cut off: power, WAN), retained births
    notwithstanding."""


class NodeDeath(_Envelope, tag="ndeath", kw_only=True, frozen=True):
    """The node went away: its MQTT Last Will (``reason="lost"``) or a clean stop."""

    node: str
    bdseq: Seq
    reason: str = "lost"


class DeviceBirth(_Envelope, tag="dbirth", kw_only=True, frozen=True):
    """Everything about a device's metrics on one stream; retained, sent before any data."""

    node: str
    device: str
    bdseq: Seq
    seq: Seq
    metrics: Annotated[list[MetricDef], msgspec.Meta(max_length=MAX_ITEMS)]


class DeviceData(_Envelope, tag="ddata", kw_only=True, frozen=True):
    """Values of the metrics that changed (report by exception) or a waveform block."""

    data_ts: Int64 | None = None
    """Features and scores: the data time their values describe (ms since epoch), the end
    of the window they were computed from (``window.end``); ``ts`` is when the message was
    made. None on raw data (each metric's ``ts`` is its source time)."""
    node: str
    seq: Seq
    metrics: Annotated[list[Metric], msgspec.Meta(max_length=MAX_ITEMS)]
    window: Window | None = None
    """Features and scores: the raw data they were computed from. A slow-tag features
    message carries every slow tag of the device for one window: ``good``/``total`` are
    then summed over its tags, and ``signals`` has each tag's own."""
    model: ModelRef | None = None
    """Scores: the model that computed them."""
    signals: Annotated[dict[str, SignalWindow], msgspec.Meta(max_length=MAX_ITEMS)] | None = None
    """Features of several signals in one message (a device's slow tags): signal name (the
    part of a metric's name before its last ``.``) -> that signal's provenance. None: the
    one ``window`` is the provenance of every metric (a waveform window)."""


END_OF_REPLAY: Final = "end of replay"
"""How the ``reason`` of a replayed device's raw death begins once the replay has published
every row (``end of replay: 500 rows, 500 seen back``): a recorder's sign that it is over."""


class DeviceDeath(_Envelope, tag="ddeath", kw_only=True, frozen=True):
    """The device is gone (the adapter lost it); its last values are stale."""

    node: str
    device: str
    bdseq: Seq
    seq: Seq
    reason: str = ""


EventState = Literal["raised", "updated", "cleared"]
Severity = Literal["info", "warning", "critical"]


class Event(_Envelope, tag="event", kw_only=True, frozen=True):
    """Something a person should know, once per occurrence (e.g. an anomaly raised/cleared)."""

    data_ts: Int64 | None = None
    """The data time of the transition (ms since epoch): the window end of the score that
    raised, updated or cleared it; ``ts`` is when the message was made."""
    id: str
    kind: str
    state: EventState
    device: str
    started: Int64
    """When the condition began (ms since epoch)."""
    severity: Severity = "warning"
    summary: str = ""
    score: float | None = None
    threshold: float | None = None
    count: Int64 = 1
    """How many breaches this open event has absorbed."""
    details: Annotated[dict[str, float | str], msgspec.Meta(max_length=MAX_ITEMS)] = {}


class Command(_Envelope, tag="cmd", kw_only=True, frozen=True):
    """A request to a node or device, e.g. ``rebirth`` or ``fault``."""

    name: str
    args: Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_ITEMS)] = {}
    id: str = ""
    sender: str = ""


class Reply(_Envelope, tag="reply", kw_only=True, frozen=True):
    """The answer to a node command that asked for one (``args.reply_to``: a topic)."""

    id: str = ""
    """The command's id."""
    ok: bool = True
    result: Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_ITEMS)] = {}
    error: str = ""


HealthState = Literal["ok", "warning", "critical"]
HealthLevel = Literal["site", "area", "line", "cell"]


class HealthCause(msgspec.Struct, kw_only=True, frozen=True):
    """One device that makes its group's health what it is, and why."""

    device: str
    state: HealthState
    reason: str


class Health(_Envelope, tag="health", kw_only=True, frozen=True):
    """A cell's, line's, area's or site's health, the worst of its devices' (rule:
    uns-schema/README.md, Health); retained at ``{path}/_health``."""

    level: HealthLevel
    path: str
    """The group: ``enterprise/site``, ``…/area``, ``…/area/line`` or ``…/line/cell``."""
    state: HealthState
    devices: Int64 = 0
    """How many devices of the plant are in the group."""
    offline: Int64 = 0
    open_events: Int64 = 0
    causes: Annotated[list[HealthCause], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """The devices at the group's state (none when ok)."""
    node: str = ""
    """The node id of the plant service that published it: the message is current while
    that node's birth stands and no death does (uns-schema/README.md, Health)."""


OeeLevel = Literal["line", "cell"]
OeeWindow = Literal["shift", "hour"]


class Oee(_Envelope, tag="oee", kw_only=True, frozen=True):
    """A line's or cell's OEE over its current shift or the rolling hour, with the inputs it
    is computed from (rule: uns-schema/README.md, OEE); retained at
    ``{path}/_oee/{window}``. availability = run_s / planned_s, performance = count /
    ideal_count, quality = good / count, oee = their product."""

    level: OeeLevel
    path: str
    window: OeeWindow
    shift: str = ""
    """The shift's name (window ``shift``)."""
    start: Int64
    """The window's start (ms): the shift's start, or an hour before ``end``."""
    end: Int64
    """The data time it is computed up to (ms)."""
    final: bool = False
    """The shift has ended: this is its result."""
    availability: float
    performance: float
    quality: float
    oee: float
    planned_s: float
    """Planned production time: in the shift, outside its breaks, since the first data."""
    run_s: float
    ideal_count: float
    """Parts the run time makes at the ideal cycle times."""
    count: Int64
    good: Int64
    scrap: Int64 = 0
    devices: Int64 = 0
    flags: Annotated[dict[str, list[str]], msgspec.Meta(max_length=MAX_ITEMS)] = {}
    """Flag -> the devices it concerns: ``quality_assumed`` (no quality counter: counted
    good), ``offline`` (dead for part of the window: not run time), ``counter_reset``,
    ``counter_rollover``."""
    node: str = ""
    """The plant service's node id (stale from its death, like health)."""


Payload = (
    NodeBirth
    | NodeDeath
    | DeviceBirth
    | DeviceData
    | DeviceDeath
    | Event
    | Command
    | Reply
    | Health
    | Oee
)
PAYLOAD_TYPES: Final = (
    NodeBirth,
    NodeDeath,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Event,
    Command,
    Reply,
    Health,
    Oee,
)
T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(payload: Payload) -> bytes:
    """JSON bytes of a payload."""
    return _encoder.encode(payload)


@functools.cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


# The depth check keeps only brackets and quotes (C-speed bytes methods, no Python loop
# over characters): a scanner in Python cost 5-10x the decode of a 50 kB birth.
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'[]{}"')
_AS_PARENS: Final = bytes.maketrans(b"[{]}", b"(())")
_TOO_DEEP_RUN: Final = b"(" * (MAX_DEPTH + 1)


def _at_most_openers(data: bytes, limit: int) -> bool:
    """Whether ``data`` has at most ``limit`` of ``[`` and ``{``. ``count`` reads a byte per
    nanosecond, ``find`` is memchr (15x faster on a 5.5 kB waveform block) but costs a call
    per bracket: count small messages, find in large ones, stopping at ``limit``."""
    if len(data) <= 4096:
        return data.count(b"[") + data.count(b"{") <= limit
    n = 0
    for opener in b"[{":
        i = data.find(opener)
        while i >= 0:
            n += 1
            if n > limit:
                return False
            i = data.find(opener, i + 1)
    return True


def _check_depth(data: bytes) -> None:
    """Refuse JSON nested deeper than `MAX_DEPTH`, wherever it is (unknown fields too).

    Brackets inside strings do not count. Malformed JSON is left to the decoder, which
    says where it is malformed.
    """
    if _at_most_openers(data, MAX_DEPTH):
        return  # most messages: too few brackets to be too deep
    if b"\\" in data:  # escapes first, so that a quote left over always delimits a string
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = data.translate(_AS_PARENS, _NOT_STRUCTURE)
    brackets = shape.replace(b'""', b"")  # strings without brackets in them
    if b'"' in brackets:
        brackets = b"".join(shape.split(b'"')[::2])
    for _ in range(MAX_DEPTH):
        if not brackets:
            return
        if _TOO_DEEP_RUN in brackets:
            break
        inner_removed = brackets.replace(b"()", b"")  # one level per pass
        if len(inner_removed) == len(brackets):
            return  # unbalanced: malformed, the decoder says where
        brackets = inner_removed
    if brackets:
        raise PayloadError(f"JSON nested deeper than {MAX_DEPTH} levels")


def _check_free_form(value: Any, at: str) -> None:
    """Limits on a value of any shape (a command's ``args``, a reply's ``result``)."""
    todo = [(value, at)]
    while todo:
        v, where = todo.pop()
        if isinstance(v, (dict, list)):
            if len(v) > MAX_ITEMS:
                raise PayloadError(
                    f"{len(v)} elements, over the limit of {MAX_ITEMS} - at `{where}`"
                )
            if isinstance(v, dict):
                todo.extend((x, f"{where}.{k}") for k, x in v.items())
            else:
                todo.extend((x, f"{where}[{i}]") for i, x in enumerate(v))
        elif type(v) is int and not INT_MIN <= v <= INT_MAX:
            raise PayloadError(f"integer out of range (64 bits) - at `{where}`")


def _shortened(reason: str, limit: int = 240) -> str:
    """msgspec quotes a wrong value whole (``Invalid value 'xxx…'``): keep a log line short,
    and its end, which says where (``- at `$.state```)."""
    if len(reason) <= limit:
        return reason
    return f"{reason[: limit - 100]}…{reason[-99:]}"


def decode(data: bytes | str, kind: type[T] | Any = Payload) -> T:
    """Decode and type-check a payload; raise `PayloadError` naming where it is wrong.

    Nothing else escapes, whatever the input: the limits of this module are checked
    first, and what the decoder raises on hostile input (deep recursion, invalid UTF-8)
    becomes a `PayloadError` too.
    """
    decoder = _decoder(kind)  # type: ignore[arg-type]  # outside the try: a bad kind is a bug
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(f"not valid UTF-8: {exc.reason}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{len(data)} bytes, over the limit of {MAX_PAYLOAD_BYTES}")
    _check_depth(data)
    if kind is msgspec.Raw and not data.isascii():  # Raw skips strings without reading them
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"not valid UTF-8: {exc}") from None
    try:
        decoded = decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise PayloadError(_shortened(str(exc))) from None
    except RecursionError:
        raise PayloadError("JSON nested too deeply to decode") from None
    except UnicodeError as exc:  # msgspec 0.22 raises UnicodeDecodeError on invalid UTF-8
        raise PayloadError(f"not valid UTF-8: {exc}") from None
    if type(decoded) is Command:
        _check_free_form(decoded.args, "$.args")
    elif type(decoded) is Reply:
        _check_free_form(decoded.result, "$.result")
    return decoded  # type: ignore[no-any-return]


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
