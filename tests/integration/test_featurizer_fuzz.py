"""The featurizer under a storm of hostile raw payloads (issue 15), on the in-memory bus and
through a real broker: nothing escapes a handler, nothing hangs, every rejection is counted,
and the valid traffic after the storm is still featurized."""

from __future__ import annotations

import asyncio
import math
import os
import random
import struct
import time
from contextlib import AsyncExitStack
from typing import Any

import hypothesis
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.logs import capturing_logs
from uns import (
    Bus,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Inbound,
    Metric,
    MetricDef,
    Reject,
    Waveform,
    connect,
    decode,
    encode,
    now_ms,
)
from uns.testing import Watcher, running, watching
from uns_featurizer import Featurizer

pytestmark = pytest.mark.integration

FS = 10_000.0
EXAMPLES = int(os.environ.get("UNS_FUZZ_EXAMPLES", "10000"))
"""Hostile payloads per run (raise it for a longer hunt)."""
BATCH = 10
"""Payloads per hypothesis example: its per-example bookkeeping is ~2 ms on a loaded box."""
ADAPTER = "adapter"
BDSEQ = 10
SETTINGS: dict[str, Any] = {
    "slow": {"window_s": 1, "hop_s": 0.5},
    "waveform": {"window": 1000, "max_block": 4096},
    "queue_size": 100_000,
}
HANG_S = 10.0
"""No single message may hold a handler this long (a hang bound, not a speed target: a
message takes well under a millisecond; the old code hung for 85 s and more)."""
YEAR_MS = 365 * 86_400_000
FLOOR_MS = 946_684_800_000  # 2000-01-01: older is refused


class Checked(Featurizer):
    """The featurizer with its handlers watched: what escapes them, and how long they take."""

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.escaped: list[BaseException] = []
        self.rejected = 0
        self.calls = 0
        self.slowest = 0.0
        self.marker_topic = ""
        self.marker = asyncio.Event()

    async def _watched(self, handler: Any, msg: Any) -> None:
        started = time.perf_counter()
        self.calls += 1
        try:
            await handler(msg)
        except Reject:
            self.rejected += 1
            raise
        except Exception as exc:  # not CancelledError: the node stopping at the end
            self.escaped.append(exc)
            raise
        finally:
            self.slowest = max(self.slowest, time.perf_counter() - started)

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        await self._watched(super().on_data, msg)

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        await self._watched(super().on_death, msg)

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        await self._watched(super().on_birth, msg)
        if msg.topic == self.marker_topic:
            self.marker.set()


def counted(f: Featurizer) -> float:
    """Every drop and every exclusion so far (a rejection moves one of them).

    Read from each labelled child of the two counters: ``collect()`` costs ~1 ms, ten
    thousand times; the values are the same."""
    total = 0.0
    for counter in (f.node.metrics.dropped, f.excluded.metric):
        total += sum(child._value.get() for child in counter._metrics.values())
    return total


def waveform(t0_us: int, n: int = 1000, value: float = 0.0, **kw: Any) -> Waveform:
    x = np.sin(np.arange(n) * 0.3).astype(np.float32) + np.float32(value)
    return Waveform.from_values(x, t0_us=t0_us, rate_hz=FS, **kw)


class Stream:
    """The valid traffic of the device: a waveform block and two slow tags every 100 ms."""

    def __init__(self, bus: Bus, device: str) -> None:
        self.bus, self.device = bus, device
        self.t = now_ms() - 60_000
        self.seq = 0

    async def birth(self) -> None:
        birth = DeviceBirth(
            ts=now_ms(),
            node=ADAPTER,
            device=self.device,
            bdseq=BDSEQ,
            seq=0,
            metrics=[
                MetricDef(name="vibration", datatype="waveform", unit="g", rate_hz=FS),
                MetricDef(name="bearing_temp", datatype="float", unit="degC"),
                MetricDef(name="motor_speed", datatype="float", unit="rpm"),
            ],
        )
        await self.bus.publish(f"{self.device}/raw/birth", encode(birth), qos=1, retain=True)

    async def run(self, n: int) -> None:
        for _ in range(n):
            self.t += 100
            self.seq = (self.seq + 1) % 256
            data = DeviceData(
                ts=self.t,
                node=ADAPTER,
                seq=self.seq,
                metrics=[
                    Metric(name="vibration", value=waveform(self.t * 1000)),
                    Metric(name="bearing_temp", value=50.0 + (self.seq % 3)),
                    Metric(name="motor_speed", value=1480.0),
                ],
            )
            await self.bus.publish(f"{self.device}/raw/data", encode(data), qos=1)


def features_since(signal: str, start_ms: int) -> Any:
    def match(m: Any) -> bool:
        if not m.topic.endswith("/features/data") or f'"{signal}.'.encode() not in m.payload:
            return False
        data = decode(m.payload, DeviceData)
        return data.window is not None and data.window.start >= start_ms

    return match


# ---- what a hostile sender sends ----------------------------------------------------------

OTHERS = ["intruder", "adapter-2", "ADAPTER", "adapter ", "", "\x00", "a" * 10_000, "featurizer"]
SIZES = {"f32": 4, "f64": 8, "i16": 2}
BAD_FLOATS = [math.nan, math.inf, -math.inf]
BAD_RATES = [0.0, -0.0, -FS, 1e12, 1e300, 1e-300, 5e-324, 0.5, 2 * FS, FS + 1, *BAD_FLOATS]
STALE_BDSEQ = [*range(138, 256), *range(BDSEQ)]  # older than the birth's, modulo 256
BAD_LEVELS = ["Not A Slug", "_node", "UPPER", "a" * 65, "dot.ted", "", "é"]
ATTACKS = [
    "rate", "samples", "scale", "block_time", "block_size", "slow_time", "message_time",
    "nan", "wide_int", "type_slow", "type_wave", "name", "mixed",
    "foreign_data", "foreign_death", "stale_death", "bdseq_death", "birth_device",
    "birth_bdseq",
]  # fmt: skip
METRIC_ATTACKS = ATTACKS[:13]
TRANSFORMS = ["as_is", "as_is", "truncated", "garbage", "wrong_type", "deep", "topic"]


class Hostile:
    """Builds one hostile payload from (attack, seed): hypothesis draws only those two (and
    how bytes are mangled), so ten thousand cost seconds, not minutes (a hypothesis draw
    costs ~0.3 ms on a loaded machine; a payload needs dozens of values)."""

    def __init__(self, device: str, t_ms: int, seed: int) -> None:
        self.device, self.t_ms = device, t_ms
        self.rng = random.Random(seed)

    def any_float(self) -> float:
        r = self.rng
        if r.random() < 0.3:
            return r.choice([*BAD_FLOATS, 0.0, -0.0, 1e308, -1e308, 5e-324, 1.0])
        return float(struct.unpack("<d", r.randbytes(8))[0])  # any double, NaN included

    def any_int(self, bits: int = 80) -> int:
        return self.rng.getrandbits(self.rng.randint(1, bits)) * self.rng.choice([1, -1])

    def far_ts(self) -> int:
        r = self.rng
        return r.choice(
            [
                2**63 - 1,
                2**64 + 7,
                -(2**63),
                0,
                -1,
                10**30,
                self.t_ms + 31 * YEAR_MS,
                now_ms() + 10 * 60_000 + r.getrandbits(40),  # beyond max_future_s
                r.randint(-(10**20), FLOOR_MS - 1),  # before 2000
                10 ** r.randint(16, 4000),
            ]
        )

    def other(self) -> str:
        r = self.rng
        name = r.choice(OTHERS) if r.random() < 0.7 else r.randbytes(8).decode("latin-1")
        return "intruder" if name == ADAPTER else name

    def block(self, attack: str) -> Waveform:
        r = self.rng
        dtype = r.choice(list(SIZES))
        size = SIZES[dtype]
        samples = r.randbytes(r.randint(1, 512) * size)
        f: dict[str, Any] = {"t0_us": self.t_ms * 1000, "rate_hz": FS, "dtype": dtype}
        if attack == "rate":
            f["rate_hz"] = r.choice(BAD_RATES) if r.random() < 0.5 else r.uniform(-1e7, 0.999)
        elif attack == "samples":  # not whole samples, or none at all
            extra = r.randint(0, size - 1)
            samples = samples + b"\0" * extra if extra else b""
        elif attack == "scale":
            f["scale"] = r.choice([0.0, -0.0, *BAD_FLOATS])
        elif attack == "block_time":
            f["t0_us"] = self.far_ts() * 1000
        else:  # above SETTINGS' max_block
            samples = b"\0" * size * r.randint(4097, 6000)
        return Waveform(samples=samples, block=self.any_int(), **f)

    def metric(self, attack: str) -> Metric:
        """One metric the featurizer must refuse (and count), whatever else is with it."""
        r = self.rng
        quality = r.choice(["good", "good", "uncertain", "bad"])
        slow = r.choice(["bearing_temp", "motor_speed"])
        if attack == "mixed":
            attack = r.choice(METRIC_ATTACKS[:-1])
        if attack in ("rate", "samples", "scale", "block_time", "block_size"):
            return Metric(name="vibration", value=self.block(attack))
        if attack in ("slow_time", "message_time"):
            value = r.choice([self.any_float(), self.any_int(), None])
            name = r.choice([slow, "new_tag"])
            return Metric(name=name, value=value, ts=self.far_ts(), quality=quality)
        if attack == "nan":
            return Metric(name=slow, value=r.choice([*BAD_FLOATS, None]))
        if attack == "wide_int":
            wide = r.choice([2**64 + r.getrandbits(64), -(2**63) - 1 - r.getrandbits(64)])
            return Metric(name=slow, value=wide * r.choice([1, 10 ** r.randint(0, 4000)]))
        if attack == "type_slow":
            text = r.randbytes(r.randint(0, 20)).decode("latin-1")
            value = r.choice([text, True, False, self.block(r.choice(["rate", "scale"]))])
            return Metric(name=slow, value=value, quality=quality)
        if attack == "type_wave":
            value = r.choice([self.any_float(), self.any_int(), "x", True, None])
            return Metric(name="vibration", value=value, quality=quality)
        name = "x" * r.randint(257, 5000)
        return Metric(name=name, value=self.any_float(), quality=quality)

    def struct(self, attack: str) -> tuple[str, Any]:
        """(topic, struct) of one attack."""
        r, device = self.rng, self.device
        seq = self.any_int()
        ts = self.far_ts() if attack == "message_time" or r.random() < 0.2 else self.t_ms
        if attack in METRIC_ATTACKS:
            n = r.randint(2, 4) if attack == "mixed" else 1
            if attack == "message_time":  # the metrics take the message's time
                metrics = [Metric(name="bearing_temp", value=self.any_float())]
            else:
                metrics = [self.metric(attack) for _ in range(n)]
            data = DeviceData(ts=ts, node=ADAPTER, seq=seq, metrics=metrics)
            return f"{device}/raw/data", data
        if attack == "foreign_data":  # even good values: not from the node that announced it
            good = [Metric(name="bearing_temp", value=50.0)]
            more = [self.metric(r.choice(METRIC_ATTACKS)) for _ in range(r.randint(0, 2))]
            data = DeviceData(ts=ts, node=self.other(), seq=seq, metrics=good + more)
            return f"{device}/raw/data", data
        if attack.endswith("_death"):
            node, bdseq = ADAPTER, r.choice(STALE_BDSEQ)
            if attack == "foreign_death":
                node, bdseq = self.other(), r.randint(0, 255)
            elif attack == "bdseq_death":
                bdseq = r.choice([256 + self.any_int(70) ** 2, -1 - self.any_int(70) ** 2])
            death = DeviceDeath(ts=ts, node=node, device=device, bdseq=bdseq, seq=seq)
            return f"{device}/raw/death", death
        wrong_device = attack == "birth_device"  # a birth for another device, or no session
        birth = DeviceBirth(
            ts=ts,
            node=ADAPTER,
            device=device + "-x" if wrong_device else device,
            bdseq=BDSEQ if wrong_device else 256 + self.any_int(70) ** 2,
            seq=0,
            metrics=[MetricDef(name="vibration", datatype="waveform", rate_hz=FS)],
        )
        return f"{device}/raw/birth", birth

    def raw(self, attack: str, transform: str) -> tuple[str, bytes]:
        """(topic, bytes): the attack as JSON, mangled so it cannot decode, or on a topic
        that is no device path."""
        r = self.rng
        topic, payload = self.struct(attack)
        body = msgspec.json.encode(payload)  # NaN and inf become null: refused by the decoder
        if transform == "truncated":  # no prefix of a JSON object is one
            body = body[: r.randint(1, len(body) - 1)]
        elif transform == "garbage":
            body = b"\x00" + r.randbytes(r.randint(0, 2000))
        elif transform == "wrong_type":
            doc: dict[str, Any] = {"type": "ddata", "ts": self.t_ms, "node": ADAPTER, "seq": 1}
            doc["metrics"] = [{"name": "bearing_temp", "value": 1.0}]
            field, wrong = r.choice(
                [
                    ("ts", "yesterday"),
                    ("ts", 1.5),
                    ("ts", [1, 2]),
                    ("node", 7),
                    ("node", None),
                    ("seq", "one"),
                    ("seq", 2.5),
                    ("metrics", {"a": "b"}),
                    ("metrics", [{"name": 1, "value": 2}]),
                    ("metrics", [{"value": 2}]),
                    ("metrics", [{"name": "x", "value": {"t0_us": "now", "rate_hz": 1}}]),
                    ("type", "ddeath"),
                    ("v", "one"),
                ]
            )
            doc[field] = wrong
            topic, body = f"{self.device}/raw/data", msgspec.json.encode(doc)
        elif transform == "deep":
            depth = r.randint(33, 5000)
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
            topic = f"{self.device}/raw/data"
            body = b'{"type":"ddata","ts":1,"node":"adapter","seq":0,"metrics":[{"name":"x",'
            body += b'"value":' + opener * depth + b"1" + closer * depth + b"}]}"
        elif transform == "topic":
            parts = topic.split("/")
            parts[r.randint(1, 5)] = r.choice(BAD_LEVELS)
            topic = "/".join(parts)
        return topic, body


def hostile_payloads(device: str, t_ms: int) -> st.SearchStrategy[list[tuple[str, str, Any]]]:
    """Batches of ("struct", topic, decoded struct) or ("bytes", topic, payload): each is
    refused in part or whole, and must be counted."""

    def build(choice: tuple[tuple[str, str, str], int]) -> tuple[str, str, Any]:
        (via, attack, transform), seed = choice
        h = Hostile(device, t_ms, seed)
        if via == "struct":
            return ("struct", *h.struct(attack))
        return ("bytes", *h.raw(attack, transform))

    kinds = [("struct", a, "as_is") for a in ATTACKS]
    kinds += [("bytes", a, t) for a in ATTACKS for t in TRANSFORMS]
    kinds += [("struct", a, "as_is") for a in ATTACKS] * (len(TRANSFORMS) - 1)  # half each
    one = st.tuples(st.sampled_from(kinds), st.integers(min_value=0, max_value=2**32))
    one = one.map(build)
    return st.lists(one, min_size=BATCH, max_size=BATCH)


# ---- the storm ----------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_ten_thousand_hostile_raw_payloads_neither_crash_nor_hang_and_all_are_counted(
    memory_url: str, prefix: str
) -> None:
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    marker_device = f"{prefix}/pune/stamping/line-3/cell-a/marker"
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    kinds = {"struct": 0, "bytes": 0}
    uncounted: list[Any] = []

    async def start() -> tuple[Checked, Watcher, Bus, Stream]:
        node = await stack.enter_async_context(running(Checked, memory_url, prefix, **SETTINGS))
        w = await stack.enter_async_context(
            watching(memory_url, f"{prefix}/+/+/+/+/+/features/data")
        )
        bus = await stack.enter_async_context(connect(memory_url))
        f = node.running
        assert isinstance(f, Checked)
        f.marker_topic = f"{marker_device}/raw/birth"
        return f, w, bus, Stream(bus, device)

    f, w, bus, stream = loop.run_until_complete(start())
    marker = encode(DeviceBirth(ts=1, node="m", device=marker_device, bdseq=0, seq=0, metrics=[]))

    async def before() -> None:
        await stream.birth()
        await stream.run(30)
        await w.wait_for(features_since("vibration", 0), timeout=60)
        await w.wait_for(features_since("bearing_temp", 0), timeout=60)

    loop.run_until_complete(before())

    async def through_dispatch(topic: str, body: bytes) -> None:
        f.marker.clear()
        await bus.publish(topic, body)
        await bus.publish(f.marker_topic, marker)  # in order behind it: it has been handled
        await asyncio.wait_for(f.marker.wait(), 60)

    async def direct(topic: str, struct: Any) -> bool:
        handler = {"data": f.on_data, "death": f.on_death, "birth": f.on_birth}
        try:
            await handler[topic.rsplit("/", 1)[1]](Inbound(topic, struct, False))
        except Reject:
            return True
        return False

    @settings(
        max_examples=EXAMPLES // BATCH,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=(hypothesis.Phase.generate, hypothesis.Phase.shrink),
    )
    @given(batch=hostile_payloads(device, stream.t))
    def storm(batch: list[tuple[str, str, Any]]) -> None:
        loop.run_until_complete(feed(batch))
        assert not f.escaped, f.escaped

    async def feed(batch: list[tuple[str, str, Any]]) -> None:
        for kind, topic, body in batch:
            kinds[kind] += 1
            before = counted(f)
            if kind == "struct":
                rejected = await direct(topic, body)
            else:
                await through_dispatch(topic, body)
                rejected = False
            if not rejected and counted(f) == before:
                uncounted.append((topic, body))

    started = time.perf_counter()
    storm()
    storm_s = time.perf_counter() - started

    async def after() -> int:
        stream.t = max(stream.t, now_ms() - 10_000)
        start_ms = stream.t + 100
        await stream.run(40)
        await w.wait_for(features_since("vibration", start_ms), timeout=60)
        await w.wait_for(features_since("bearing_temp", start_ms), timeout=60)
        return start_ms

    try:
        start_ms = loop.run_until_complete(after())
        feats = [decode(m.payload, DeviceData) for m in w.seen]
        errors = f.node.metrics.registry.get_sample_value(
            "uns_handler_errors_total", {"service": "featurizer"}
        )
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
    slowest_ms = f.slowest * 1000
    print(f"storm: {kinds} in {storm_s:.1f} s; slowest handler call {slowest_ms:.1f} ms")
    assert sum(kinds.values()) >= EXAMPLES and min(kinds.values()) >= EXAMPLES // 4
    assert not f.escaped and not errors
    assert f.slowest < HANG_S
    assert not uncounted, uncounted[:5]
    late = [d for d in feats if d.window is not None and d.window.start >= start_ms]
    assert {m.name.split(".")[0] for d in late for m in d.metrics} >= {"vibration", "bearing_temp"}
    assert all(d.window is not None and d.window.node == ADAPTER for d in feats)
    assert all(
        isinstance(m.value, float) and math.isfinite(m.value) for d in feats for m in d.metrics
    )


# ---- through a real broker ----------------------------------------------------------------


async def test_an_anonymous_client_on_a_real_broker_cannot_stop_or_fake_the_features(
    amqtt_broker: Any, prefix: str
) -> None:
    """The issue's own cases, sent by another MQTT client through amqtt: a stamp of 2^63-1
    and one 31 years ahead on a live tag, forged data and a forged death from another node,
    rate 0 and broken bytes. The device's features go on, from its own node only."""
    url = amqtt_broker.url
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    with capturing_logs("uns_featurizer") as records:
        async with (
            running(Featurizer, url, prefix, **SETTINGS) as node,
            watching(url, f"{prefix}/+/+/+/+/+/features/data") as w,
            connect(url) as adapter,
            connect(url) as intruder,
        ):
            stream = Stream(adapter, device)
            stream.t = now_ms() - 20_000
            await stream.birth()
            await stream.run(20)
            await w.wait_for(features_since("bearing_temp", 0), timeout=30)
            t = stream.t
            attacks = [
                DeviceData(
                    ts=t,
                    node=ADAPTER,
                    seq=1,
                    metrics=[Metric(name="bearing_temp", value=99.0, ts=2**63 - 1)],
                ),
                DeviceData(
                    ts=now_ms() + 31 * YEAR_MS,
                    node=ADAPTER,
                    seq=2,
                    metrics=[
                        Metric(name="bearing_temp", value=99.0),
                        Metric(name="vibration", value=waveform((now_ms() + 31 * YEAR_MS) * 1000)),
                    ],
                ),
                DeviceData(
                    ts=t,
                    node=ADAPTER,
                    seq=3,
                    metrics=[
                        Metric(
                            name="vibration",
                            value=Waveform(t0_us=t * 1000, rate_hz=0.0, samples=b"\0" * 4000),
                        ),
                        Metric(
                            name="vibration",
                            value=Waveform(t0_us=t * 1000, rate_hz=FS, samples=b"\0" * 4001),
                        ),
                        Metric(name="bearing_temp", value=2**64 + 1),
                    ],
                ),
                DeviceData(
                    ts=t, node="intruder", seq=4, metrics=[Metric(name="bearing_temp", value=99.0)]
                ),
            ]
            for attack in attacks:
                await intruder.publish(f"{device}/raw/data", encode(attack), qos=1)
            death = DeviceDeath(ts=now_ms(), node="intruder", device=device, bdseq=BDSEQ, seq=0)
            await intruder.publish(f"{device}/raw/death", encode(death), qos=1)
            start_ms = stream.t + 100
            await stream.run(30)
            temp = await w.wait_for(features_since("bearing_temp", start_ms), timeout=30)
            await w.wait_for(features_since("vibration", start_ms), timeout=30)
            assert node.metrics.dropped_count("foreign_node") == 2
    feats = {m.name: m.value for m in decode(temp.payload, DeviceData).metrics}
    assert feats["bearing_temp.max"] <= 52.0  # no 99 from any attack
    lines = " ".join(r.getMessage() for r in records.records)
    assert "ahead of this box's clock" in lines and "rate_hz 0.0" in lines
