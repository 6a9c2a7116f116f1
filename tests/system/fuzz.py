"""Hostile payloads for every service's input topics, generated with hypothesis.

Each hypothesis example draws a handful of hostile ingredients (numbers, timestamps,
texts, topics, nested values, raw bytes, a nesting depth) and, per target, a mutation; a
`Builder` turns them into messages close enough to the contract to get past the first
check and into the handlers: a valid message of the target's type with one field set to a
hostile value, deleted or retyped, an unknown schema version or type tag, deep nesting,
junk bytes, a truncated message, an oversize one. One example gives one message per
target, so a few thousand examples give tens of thousands of messages.

Targets (what each service subscribes to, see each service's ``node.subscribe``):

* featurizer: ``…/raw/birth``, ``…/raw/data`` (and ``…/raw/death``);
* inference (and the bridge, which forwards them): ``…/features/birth|data|death``;
* the bridge: ``+/+/_node/+/birth|death``;
* the simulator: ``…/cmd/fault``, ``…/cmd/clear``;
* every service: ``{ent}/{site}/_node/{id}/cmd``, ``args.reply_to`` hostile.

Real devices get hostile data, deaths and commands (never retained, never from their
real producer's node id); births and retained messages go to made-up devices and nodes
(``…/fuzz/…``, ``fuzz-…``), so the real plant keeps its own retained state, and every
retained topic used is listed for the clean-up.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ENTERPRISE, SITE = "acme", "pune"
FUZZ_DEVICES = [
    f"{ENTERPRISE}/{SITE}/fuzz/line-{i % 3}/cell-{i % 2}/dev-{i:02d}" for i in range(24)
]
FUZZ_NODES = [f"fuzz-{i}" for i in range(8)]
FEATURES = ["vibration.rms", "vibration.kurtosis", "vibration.env_bpfo", "bearing_temp.mean"]
YEAR_MS = 365 * 24 * 3600 * 1000
LONG_TOPIC = "<a 70,000-character topic>"
"""Stands for one in the strategies (a huge literal makes hypothesis's reprs slow)."""

OPS = (
    "valid",
    "set",
    "set",
    "set",
    "delete",
    "version",
    "tag",
    "unknown_field",
    "deep",
    "junk",
    "truncate",
    "not_object",
)
"""Mutations, with 'set' (one field hostile) three times as likely as the others."""
TARGETS = 28
"""Messages per example (`Builder.targets`)."""
OPS_PER_EXAMPLE = 7
"""Mutations drawn per example, taken in turn by its messages (fewer draws, faster)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- ingredients -------------------------------------------------------------------------


@dataclass(frozen=True)
class Offset:
    """A time relative to the moment the message is built (the strategy itself must not
    depend on the clock: hypothesis replays draws)."""

    ms: int


@functools.cache
def ingredients() -> st.SearchStrategy[dict[str, Any]]:
    """What one example draws. Built on first use, not at import (hypothesis warns about
    strategies built while pytest loads its plugins)."""
    numbers = st.one_of(
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 1, 255, 256, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 1e-300]),
    )
    texts = st.one_of(
        st.text(max_size=24),
        st.sampled_from(["", " ", "\x00", "\ud800", "é/ü", "..", "a" * 300, "NaN", "Infinity"]),
    )
    topics = st.one_of(
        st.sampled_from(
            [
                "#",
                "+",
                "a/#",
                "a/+/b",
                "",
                "/",
                "//",
                "$SYS/broker/x",
                "a\x00b",
                "acme/pune/_node/featurizer/cmd",
                "acme/pune/stamping/line-3/cell-a/press-01/raw/data",
                "acme/pune/stamping/line-3/cell-a/press-01/events/anomaly",
                "uns-cli/reply/x",
                LONG_TOPIC,
            ]
        ),
        st.text(max_size=40),
        st.integers(),
        st.lists(st.text(max_size=5), max_size=3),
    )
    leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
    nested = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
        max_leaves=10,
    )
    hostile = st.one_of(numbers, texts, nested, st.sampled_from([None, True, [], {}, "1"]))
    # hostile: a value for any field

    timestamps = st.one_of(
        st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64]),
        st.sampled_from([Offset(0), Offset(31 * YEAR_MS), Offset(-31 * YEAR_MS), Offset(1)]),
        st.integers(min_value=-10 * YEAR_MS, max_value=10 * YEAR_MS).map(Offset),
        numbers,
        texts,
    )

    strategy = st.fixed_dictionaries(
        {
            "value": hostile,
            "number": numbers,
            "ts": timestamps,
            "text": texts,
            "topic": topics,
            "raw": st.binary(max_size=64),
            "depth": st.integers(min_value=100, max_value=20_000),
            "cut": st.floats(min_value=0.0, max_value=1.0),
            "sample_bytes": st.integers(min_value=0, max_value=9000),
            "rate": st.one_of(numbers, st.just(10_000.0)),
            "ops": st.lists(
                st.sampled_from(OPS), min_size=OPS_PER_EXAMPLE, max_size=OPS_PER_EXAMPLE
            ),
            "pick": st.integers(min_value=0, max_value=10**6),
            "retain": st.booleans(),
            "name": st.one_of(
                st.sampled_from(["rebirth", "status", "fault", "clear", "ping"]), texts
            ),
        }
    )
    return strategy


# ---- messages ------------------------------------------------------------------------------


@dataclass
class Message:
    target: str
    """The service it is aimed at."""
    topic: str
    payload: bytes
    retain: bool
    op: str


@dataclass
class Batch:
    messages: list[Message] = field(default_factory=list)
    retained_topics: set[str] = field(default_factory=set)
    examples: int = 0

    def per_target(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.messages:
            out[m.target] = out.get(m.target, 0) + 1
        return out


def _samples(n: int) -> str:
    return base64.b64encode(struct.pack("<f", 0.5) * (n // 4) + b"\x01" * (n % 4)).decode()


def _template(kind: str, device: str, ing: dict[str, Any], node: str) -> dict[str, Any]:
    now = _now_ms()
    if kind == "raw/data":
        return {
            "type": "ddata",
            "v": 1,
            "ts": now,
            "node": node,
            "seq": ing["pick"] % 256,
            "metrics": [
                {"name": "bearing_temp", "value": 50.0, "ts": now},
                {
                    "name": "vibration",
                    "value": {
                        "t0_us": now * 1000,
                        "rate_hz": 10_000.0,
                        "samples": _samples(ing["sample_bytes"]),
                        "dtype": "f32",
                        "block": ing["pick"] % 1000,
                    },
                },
            ],
        }
    if kind == "raw/birth":
        return {
            "type": "dbirth",
            "v": 1,
            "ts": now,
            "node": node,
            "device": device,
            "bdseq": ing["pick"] % 256,
            "seq": 0,
            "metrics": [
                {"name": "vibration", "datatype": "waveform", "unit": "g", "rate_hz": 10_000.0},
                {"name": "bearing_temp", "datatype": "float", "unit": "degC"},
            ],
        }
    if kind in ("raw/death", "features/death"):
        return {
            "type": "ddeath",
            "v": 1,
            "ts": now,
            "node": node,
            "device": device,
            "bdseq": ing["pick"] % 256,
            "seq": 1,
        }
    if kind == "features/data":
        return {
            "type": "ddata",
            "v": 1,
            "ts": now,
            "node": node,
            "seq": ing["pick"] % 256,
            "metrics": [{"name": f, "value": 1.0 + i} for i, f in enumerate(FEATURES)],
            "window": {
                "start": now - 1000,
                "end": now,
                "good": 10_000,
                "total": 10_000,
                "node": "opcua-adapter",
            },
        }
    if kind == "features/birth":
        return {
            "type": "dbirth",
            "v": 1,
            "ts": now,
            "node": node,
            "device": device,
            "bdseq": ing["pick"] % 256,
            "seq": 0,
            "metrics": [{"name": f, "datatype": "double"} for f in FEATURES],
        }
    if kind == "node/birth":
        return {
            "type": "nbirth",
            "v": 1,
            "ts": now,
            "node": node,
            "service": "fuzz",
            "bdseq": ing["pick"] % 256,
            "metrics_url": "http://127.0.0.1:1/metrics",
        }
    if kind == "node/death":
        return {"type": "ndeath", "v": 1, "ts": now, "node": node, "bdseq": ing["pick"] % 256}
    if kind in ("cmd/fault", "cmd/clear"):
        return {
            "type": "cmd",
            "v": 1,
            "ts": now,
            "name": kind.split("/")[1],
            "args": {"kind": "bearing_wear", "severity": 0.5, "ramp_s": 10, "tag": "bearing_temp"},
            "id": "fuzz",
        }
    # a node command
    return {
        "type": "cmd",
        "v": 1,
        "ts": now,
        "name": ing["name"],
        "args": {"reply_to": _resolve(ing["topic"])},
        "id": ing["text"],
        "sender": "fuzz",
    }


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field path of a template (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _resolve(value: Any) -> Any:
    if isinstance(value, Offset):
        return _now_ms() + value.ms
    if value == LONG_TOPIC:
        return "x" * 70_000
    return value


def _dumps(obj: Any) -> bytes:
    # NaN and infinities come out as NaN/Infinity literals: not JSON, and so hostile too
    return json.dumps(obj, allow_nan=True).encode("utf-8", errors="surrogatepass")


class Builder:
    """Turns one example's ingredients into one message per target."""

    def __init__(self, real_devices: dict[str, str], services: list[str]) -> None:
        self.real = sorted(real_devices)
        self.producers = {
            d: "modbus-adapter" if "robot" in d else "opcua-adapter" for d in real_devices
        }
        self.services = services
        self.oversize_left = {s: 3 for s in (*services, "bridge-node")}

    def targets(self) -> list[tuple[str, str]]:
        """(service, kind) of every message an example yields: five per service (the
        bridge also takes every features message)."""
        out = [(s, "node/cmd") for s in self.services]
        out += [("featurizer", k) for k in ("raw/data", "raw/data", "raw/birth", "raw/death")]
        out += [
            ("inference", k)
            for k in ("features/data", "features/data", "features/birth", "features/death")
        ]
        out += [("bridge", "node/birth"), ("bridge", "node/death")]
        out += [("simulator", k) for k in ("cmd/fault", "cmd/clear", "cmd/clear", "node/cmd")]
        out += [(s, "node/cmd") for s in ("opcua-adapter", "modbus-adapter") for _ in range(4)]
        return out

    def build(self, ing: dict[str, Any], batch: Batch) -> None:
        for i, (service, kind) in enumerate(self.targets()):
            op = ing["ops"][(i + ing["pick"]) % len(ing["ops"])]
            # each message its own copies of the values a mutation may change in place
            own = {
                k: copy.deepcopy(v) if isinstance(v, (list, dict)) and k != "ops" else v
                for k, v in ing.items()
            }
            batch.messages.append(self._one(service, kind, op, own, i, batch))
        batch.examples += 1

    def _one(
        self, service: str, kind: str, op: str, ing: dict[str, Any], i: int, batch: Batch
    ) -> Message:
        pick = ing["pick"] + i
        node = FUZZ_NODES[pick % len(FUZZ_NODES)]
        births = kind.endswith("birth") or kind.startswith("node/")
        real_ok = not births and kind != "cmd/fault"  # no births, no real faults on the plant
        use_real = real_ok and pick % 3 != 0
        device = self.real[pick % len(self.real)] if use_real else FUZZ_DEVICES[pick % 24]
        retain = (ing["retain"] and not use_real and kind != "node/cmd") or (
            kind == "node/cmd" and ing["retain"] and pick % 7 == 0
        )
        if kind == "node/cmd":
            topic = f"{ENTERPRISE}/{SITE}/_node/{service}/cmd"
        elif kind.startswith("node/"):
            topic = f"{ENTERPRISE}/{SITE}/_node/{node}/{kind.split('/')[1]}"
        else:
            topic = f"{device}/{kind}"
        doc = _template(kind, device, ing, node)
        payload = self._mutate(doc, op, ing, service)
        if retain:
            batch.retained_topics.add(topic)
        return Message(service, topic, payload, retain, op)

    def _mutate(self, doc: dict[str, Any], op: str, ing: dict[str, Any], service: str) -> bytes:
        paths = _paths(doc)
        path = paths[ing["pick"] % len(paths)]
        if op == "valid":
            return _dumps(doc)
        if op == "set":
            # timestamps get timestamps, numbers numbers, anything else anything
            leaf = path[-1]
            if leaf in ("ts", "t0_us", "start", "end", "started"):
                value = ing["ts"]
            elif leaf in ("rate_hz",):
                value = ing["rate"]
            elif leaf in ("seq", "bdseq", "block", "good", "total", "value", "severity", "ramp_s"):
                value = ing["number"]
            elif leaf == "reply_to":
                value = ing["topic"]
            elif leaf == "samples":
                value = ing["text"] if ing["pick"] % 2 else _samples(ing["sample_bytes"] | 1)
            else:
                value = ing["value"]
            _set(doc, path, _resolve(value))
            return _dumps(doc)
        if op == "delete":
            _set(doc, path, None, delete=True)
            return _dumps(doc)
        if op == "version":
            doc["v"] = ing["number"] if ing["pick"] % 2 else ing["value"]
            return _dumps(doc)
        if op == "tag":
            doc["type"] = ing["text"] if ing["pick"] % 2 else "reply"
            return _dumps(doc)
        if op == "unknown_field":
            doc[ing["text"] or "extra"] = ing["value"]
            return _dumps(doc)
        if op == "deep":
            depth = ing["depth"]
            opener, closer = ("[", "]") if ing["pick"] % 2 else ('{"a":', "}")
            _set(doc, path, "__DEEP__")
            return _dumps(doc).replace(
                b'"__DEEP__"', (opener * depth + "1" + closer * depth).encode()
            )
        if op == "junk":
            return ing["raw"]
        if op == "truncate":
            text = _dumps(doc)
            return text[: int(len(text) * ing["cut"])]
        if op == "not_object":
            if self.oversize_left.get(service, 0) > 0 and ing["pick"] % 50 == 0:
                self.oversize_left[service] -= 1  # a few oversize ones per service
                size = 1_000_000 + (ing["pick"] % 4) * 1_000_000
                doc["metrics"] = [{"name": "x", "value": 1.0}] * (size // 27)
                return _dumps(doc)
            return _dumps(ing["value"])
        raise AssertionError(op)


def generate(
    builder: Builder, examples: int, sink: Callable[[list[Message]], None] | None = None
) -> Batch:
    """Run hypothesis for ``examples`` examples (generate phase only: no shrinking, no
    database), building every example's messages and handing each example's to ``sink``
    (a publisher) as soon as they are built."""
    batch = Batch()

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(ingredients())
    def draw(ing: dict[str, Any]) -> None:
        first = len(batch.messages)
        builder.build(ing, batch)
        if sink is not None:
            sink(batch.messages[first:])

    draw()
    return batch
