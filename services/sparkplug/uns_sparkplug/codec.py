"""Sparkplug B 3.0 on the wire: topics, ids, datatypes, payloads, STATE, quality.

Pure logic (protobuf and msgspec only), shared by the north edge node and the south
adapter, and light enough for the settings to import.

The id mapping (README "Sparkplug B", uns-schema/README.md), reversible because a
namespace slug never holds a ``.``:

* group id = the enterprise (or ``group_id``), edge node id = the site (or
  ``edge_node_id``);
* device id = ``{area}.{line}.{cell}.{device}``;
* metric name = ``{stream}/{metric}`` (``raw/temperature``, ``features/rms``,
  ``scores/anomaly``, ``events/{kind}/state``); ``/`` makes folders in Ignition.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

from uns.topics import SLUG, DevicePath
from uns_sparkplug import spb_pb2
from uns_sparkplug.ids import check_id as check_id

NAMESPACE: Final = "spBv1.0"
NODE_MESSAGES: Final = ("NBIRTH", "NDEATH", "NDATA", "NCMD")
DEVICE_MESSAGES: Final = ("DBIRTH", "DDEATH", "DDATA", "DCMD")
BDSEQ: Final = "bdSeq"
REBIRTH: Final = "Node Control/Rebirth"
SEQ_MODULUS: Final = 256

# Sparkplug 3.0 datatypes (the specification's enum)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
BYTES = 17
FLOAT_ARRAY = 30

DATATYPE_NAMES: Final = {
    1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16", 7: "UInt32",
    8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String", 13: "DateTime",
    14: "Text", 15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File", 19: "Template",
    30: "FloatArray", 31: "DoubleArray",
}  # fmt: skip

TO_SPARKPLUG: Final = {
    "bool": BOOLEAN, "int8": INT8, "int16": INT16, "int32": INT32, "int64": INT64,
    "uint8": UINT8, "uint16": UINT16, "uint32": UINT32, "uint64": UINT64,
    "float": FLOAT, "double": DOUBLE, "string": STRING, "waveform": FLOAT_ARRAY,
}  # fmt: skip
"""Namespace datatype -> Sparkplug datatype (a waveform block: FloatArray of its values)."""

FROM_SPARKPLUG: Final = {
    BOOLEAN: "bool", INT8: "int8", INT16: "int16", INT32: "int32", INT64: "int64",
    UINT8: "uint8", UINT16: "uint16", UINT32: "uint32", UINT64: "uint64",
    FLOAT: "float", DOUBLE: "double", STRING: "string", TEXT: "string", UUID: "string",
    DATETIME: "int64",
}  # fmt: skip
"""Sparkplug datatype -> namespace datatype; the others (data sets, templates, bytes,
files, arrays) are not taken (counted as ``reason="datatype"``)."""

_INT_BITS: Final = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_UINT_BITS: Final = {UINT8: 8, UINT16: 16, UINT32: 32, UINT64: 64}

# Quality as a metric property (Ignition's MQTT Engine reads "Quality", OPC DA codes)
QUALITY: Final = "Quality"
QUALITY_REASON: Final = "qualityReason"
QUALITY_CODES: Final = {"good": 192, "uncertain": 64, "bad": 0}
_PROP_INT32, _PROP_DOUBLE, _PROP_STRING = INT32, DOUBLE, STRING


class SparkplugError(ValueError):
    """A payload or topic that is not valid Sparkplug B: dropped and counted."""


# ---- ids and topics --------------------------------------------------------------------


def device_id(path: DevicePath) -> str:
    """``area.line.cell.device``: the device's path below the site."""
    return f"{path.area}.{path.line}.{path.cell}.{path.device}"


def device_path(enterprise: str, site: str, device: str) -> DevicePath | None:
    """The inverse of `device_id`: None when ``device`` is not four slugs joined by ``.``."""
    parts = device.split(".")
    if len(parts) != 4 or not all(SLUG.fullmatch(p) for p in parts):
        return None
    return DevicePath(enterprise, site, *parts)


def slug(text: str) -> str:
    """A namespace slug made of any Sparkplug id (lowercase, other characters -> ``-``)."""
    out = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64]
    return out or "x"


def topic(group: str, message: str, edge: str, device: str | None = None) -> str:
    base = f"{NAMESPACE}/{group}/{message}/{edge}"
    return f"{base}/{device}" if device is not None else base


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{host_id}"


@dataclass(frozen=True, slots=True)
class Topic:
    group: str
    message: str
    edge: str
    device: str | None = None


def parse_topic(text: str) -> Topic:
    parts = text.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        raise SparkplugError(f"not a Sparkplug B topic: {text[:200]!r}")
    _, group, message, edge, *rest = parts
    device = rest[0] if rest else None
    if message not in (DEVICE_MESSAGES if device is not None else NODE_MESSAGES):
        raise SparkplugError(f"unknown Sparkplug message type {message!r} in {text[:200]!r}")
    return Topic(group, message, edge, device)


# ---- STATE (Sparkplug 3.0 JSON) --------------------------------------------------------


def encode_state(online: bool, timestamp: int) -> bytes:
    return json.dumps({"online": online, "timestamp": timestamp}).encode()


def decode_state(data: bytes) -> tuple[bool, int]:
    """``(online, timestamp)`` of a 3.0 STATE payload; `SparkplugError` otherwise."""
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SparkplugError(f"STATE is not JSON: {exc}") from None
    if not isinstance(state, dict):
        raise SparkplugError("STATE is not a JSON object")
    online, ts = state.get("online"), state.get("timestamp")
    if type(online) is not bool or type(ts) is not int:
        raise SparkplugError('STATE needs {"online": bool, "timestamp": int}')
    return online, ts


# ---- values ------------------------------------------------------------------------


def set_value(metric: Any, datatype: int, value: Any) -> None:
    """Put ``value`` into the metric's value field for ``datatype`` (``is_null`` for None)."""
    if value is None or (isinstance(value, float) and math.isnan(value) and datatype < FLOAT):
        metric.is_null = True
        return
    if datatype in _INT_BITS:
        bits = _INT_BITS[datatype]
        v = int(value)
        if not -(2 ** (bits - 1)) <= v < 2 ** (bits - 1):
            raise SparkplugError(f"{v} does not fit {DATATYPE_NAMES[datatype]}")
        v &= (1 << bits) - 1  # two's complement within the type's width
        if bits == 64:
            metric.long_value = v
        else:
            metric.int_value = v
    elif datatype in _UINT_BITS:
        bits = _UINT_BITS[datatype]
        v = int(value)
        if not 0 <= v < 2**bits:
            raise SparkplugError(f"{v} does not fit {DATATYPE_NAMES[datatype]}")
        if bits == 64:
            metric.long_value = v
        else:
            metric.int_value = v
    elif datatype == DATETIME:
        metric.long_value = int(value)
    elif datatype == FLOAT:
        metric.float_value = float(value)
    elif datatype == DOUBLE:
        metric.double_value = float(value)
    elif datatype == BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype in (STRING, TEXT, UUID):
        metric.string_value = str(value)
    elif datatype == FLOAT_ARRAY:
        values = list(value)
        metric.bytes_value = struct.pack(f"<{len(values)}f", *values)
    else:
        raise SparkplugError(f"datatype {datatype} is not written")


def get_value(metric: Any, datatype: int) -> Any:
    """The value of a decoded metric for ``datatype`` (None when null or absent)."""
    if metric.is_null:
        return None
    field = metric.WhichOneof("value")
    if field is None:
        return None
    raw = getattr(metric, field)
    if datatype in _INT_BITS:
        bits = _INT_BITS[datatype]
        if type(raw) is not int:
            raise SparkplugError(f"{DATATYPE_NAMES[datatype]} in {field}")
        v = raw & ((1 << bits) - 1)  # either width of two's complement (Tahu: 32 bits)
        return v - (1 << bits) if v >> (bits - 1) else v
    if datatype in _UINT_BITS or datatype == DATETIME:
        if type(raw) is not int:
            raise SparkplugError(f"{DATATYPE_NAMES.get(datatype)} in {field}")
        return raw
    if datatype in (FLOAT, DOUBLE):
        if type(raw) is not float:
            raise SparkplugError(f"{DATATYPE_NAMES[datatype]} in {field}")
        return raw
    if datatype == BOOLEAN:
        if type(raw) is not bool:
            raise SparkplugError(f"Boolean in {field}")
        return raw
    if datatype in (STRING, TEXT, UUID):
        if type(raw) is not str:
            raise SparkplugError(f"{DATATYPE_NAMES[datatype]} in {field}")
        return raw
    raise SparkplugError(f"datatype {DATATYPE_NAMES.get(datatype, datatype)} is not read")


# ---- properties --------------------------------------------------------------------


def add_property(metric: Any, key: str, value: float | int | str) -> None:
    props = metric.properties
    props.keys.append(key)
    pv = props.values.add()
    if isinstance(value, str):
        pv.type = _PROP_STRING
        pv.string_value = value
    elif isinstance(value, int):
        pv.type = _PROP_INT32
        pv.int_value = value & 0xFFFFFFFF
    else:
        pv.type = _PROP_DOUBLE
        pv.double_value = float(value)


def properties(metric: Any) -> dict[str, Any]:
    """The metric's property set as a dict (values of the simple types only)."""
    if not metric.HasField("properties"):
        return {}
    out: dict[str, Any] = {}
    for key, pv in zip(metric.properties.keys, metric.properties.values):
        field = pv.WhichOneof("value")
        if pv.is_null or field is None or field == "propertyset_value":
            continue
        value = getattr(pv, field)
        if pv.type in _INT_BITS and field == "int_value":
            value = value - (1 << 32) if value >> 31 else value
        out[key] = value
    return out


def quality_of(code: Any) -> str:
    """Namespace quality of a ``Quality`` property (OPC DA codes; Ignition's 500+ are bad)."""
    if not isinstance(code, int):
        return "good"
    if 192 <= code < 256:
        return "good"
    if 64 <= code < 128:
        return "uncertain"
    return "bad"


# ---- payloads ----------------------------------------------------------------------


def new_payload(timestamp: int, seq: int | None) -> Any:
    payload = spb_pb2.Payload()
    payload.timestamp = timestamp
    if seq is not None:
        payload.seq = seq
    return payload


def decode_payload(data: bytes) -> Any:
    payload = spb_pb2.Payload()
    try:
        payload.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or worse on hostile input
        raise SparkplugError(f"not a Sparkplug B payload: {exc}") from None
    return payload


def bdseq_of(payload: Any) -> int | None:
    for metric in payload.metrics:
        if metric.name == BDSEQ:
            field = metric.WhichOneof("value")
            if field in ("long_value", "int_value"):
                return int(getattr(metric, field)) % SEQ_MODULUS
    return None


def node_death(bdseq: int, timestamp: int) -> bytes:
    """An NDEATH: the bdSeq metric only, no seq (Sparkplug 3.0)."""
    payload = new_payload(timestamp, None)
    m = payload.metrics.add()
    m.name = BDSEQ
    m.datatype = INT64
    m.long_value = bdseq
    return bytes(payload.SerializeToString())


def rebirth_request(timestamp: int) -> bytes:
    """An NCMD asking the edge node for a rebirth."""
    payload = new_payload(timestamp, None)
    m = payload.metrics.add()
    m.name = REBIRTH
    m.timestamp = timestamp
    m.datatype = BOOLEAN
    m.boolean_value = True
    return bytes(payload.SerializeToString())
