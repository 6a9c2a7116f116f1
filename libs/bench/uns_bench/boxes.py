"""Scenario 8, many boxes into one central broker: N synthetic edge boxes, each one
connection sending what a real box's bridge forwards (features, scores, events, births of
its machines, QoS 1, at most 100 unacknowledged, as the bridge does), into one broker on
this machine; a subscriber there (the enterprise's consumer) counts every message and
times it from the box's publish. N grows until something is lost or the p99 passes its
target: what the central broker of an enterprise namespace must carry for N boxes.

The per-machine rates come from the services' own settings and models (`streams`): a
features message per vibration window, one slow features message per device per hop
(since 2026-12-02: every slow tag of the device in one message), a scores message per
window a model scores (per vibration window, or per hop for a model of slow features),
births at the start, anomaly events at an assumed rate (a healthy plant raises none).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

from uns import (
    DeviceBirth,
    DeviceData,
    Event,
    Metric,
    MetricDef,
    ModelRef,
    NodeBirth,
    SignalWindow,
    Window,
    connect,
    encode,
    now_ms,
)
from uns.payloads import next_seq
from uns_bench.context import Context, running_once
from uns_bench.procs import Procs, in_process, load_pid, wait_broker
from uns_bench.report import Row, percentile, summarise
from uns_bench.sampler import Sampler

ENTERPRISE: Final = "bench"
LEVELS: Final = (10, 40, 100)  # 200 is past the harness (its one publisher), not the broker
QUICK_LEVELS: Final = (2, 4)
BROKER_NAMES: Final = {"amqtt": "amqtt", "mosquitto": "Mosquitto"}
P99_TARGET_MS: Final = 500.0
"""What a level must keep, box publish to central consumer: half the 1 s window the
features and scores come in (a consumer later than that falls a window behind)."""
INFLIGHT: Final = 100
"""QoS 1 publishes unacknowledged per box at most (the bridge's ``remote.inflight``)."""
EVENTS_PER_MACHINE_HOUR: Final = 2.0
"""Anomaly event messages (raised or cleared) per machine and hour: an assumption, on the
high side (a raised/cleared pair every hour on every machine; a healthy plant has none)."""
BOX_NODES: Final = ("opcua-adapter", "modbus-adapter", "featurizer", "inference", "plant", "bridge")
"""The services of a box whose node births and deaths the bridge forwards."""

Kind = Literal["features", "slow features", "scores", "events"]


@dataclass(frozen=True)
class Stream:
    """One periodic message of one machine: what its bridge forwards, how often."""

    device: str
    """The path below the site: area/line/cell/device."""
    asset: str
    kind: Kind
    period_s: float
    model: str = ""
    """For scores: the model's kind directory (anomaly, rul)."""


@dataclass(frozen=True)
class Machine:
    device: str
    asset: str


def plant_machines(machines: int | None = None) -> list[Machine]:
    """The example plant's devices (uns-schema/plant.yaml), below the site; ``machines``:
    that many instead, the plant's assets in turn, ten to a cell."""
    from uns.config import load as load_config

    devices = load_config().config.plant.devices
    own = [Machine(d.path.split("/", 2)[2], d.asset) for d in devices]
    if machines is None:
        return own
    out = []
    for i in range(machines):
        asset = own[i % len(own)].asset
        out.append(
            Machine(f"area-1/line-{i // 100:02d}/cell-{i // 10 % 10}/{asset}-{i:03d}", asset)
        )
    return out


def _models(asset: str) -> dict[str, dict[str, Any]]:
    """The cards of the models serving ``asset`` (kind -> card), as inference finds them."""
    from uns.config import REPO_ROOT

    out = {}
    for kind_dir in sorted((REPO_ROOT / "models" / asset).glob("*")):
        current = kind_dir / "current"
        if not current.is_file():
            continue
        card = kind_dir / current.read_text().strip() / "card.json"
        if card.is_file():
            out[kind_dir.name] = json.loads(card.read_text())
    return out


def _featurizer() -> Any:
    from uns.config import load as load_config
    from uns_featurizer import FeaturizerSettings

    return load_config().service("featurizer", FeaturizerSettings)


def has_vibration(asset: str) -> bool:
    """Whether the box reads this asset's waveform (a Modbus-read asset gives slow tags only)."""
    from uns_simulator import MODBUS_ASSETS

    return asset not in MODBUS_ASSETS


def slow_tags(asset: str) -> list[tuple[str, str]]:
    """(name, unit) of the slow tags the featurizer windows for ``asset``."""
    from uns_simulator import ASSETS

    ignore = set(_featurizer().ignore)
    return [(t.name, t.unit) for t in ASSETS[asset] if t.name not in ignore]


def streams(
    machines: list[Machine], *, events_per_hour: float = EVENTS_PER_MACHINE_HOUR
) -> list[Stream]:
    """Every message stream the bridge forwards for ``machines`` (births apart)."""
    from uns_featurizer import TAGS_PER_MESSAGE

    s = _featurizer()
    window_s = s.waveform.window / 10_000  # the simulator's and adapters' 10 kHz
    hop_s = s.slow.hop_s
    out = []
    for m in machines:
        vibration = has_vibration(m.asset)
        tags = slow_tags(m.asset)
        if vibration:
            out.append(Stream(m.device, m.asset, "features", window_s))
        for _ in range(math.ceil(len(tags) / TAGS_PER_MESSAGE)):
            out.append(Stream(m.device, m.asset, "slow features", hop_s))
        for kind, card in _models(m.asset).items():
            wave = [f for f in card["features"] if f.startswith("vibration.")]
            if wave and not vibration:
                continue  # a model of features this box does not compute: never scores
            slow = len(wave) < len(card["features"])
            out.append(Stream(m.device, m.asset, "scores", hop_s if slow else window_s, kind))
        if events_per_hour > 0:
            out.append(Stream(m.device, m.asset, "events", 3600 / events_per_hour))
    return out


def messages_per_s(machines: list[Machine], *, events_per_hour: float = 0.0) -> float:
    return sum(1 / st.period_s for st in streams(machines, events_per_hour=events_per_hour))


# ---- payloads, as the services encode them -------------------------------------------------


class _Payloads:
    """Each asset's messages as the featurizer, inference and the box's nodes send them,
    from the services' own feature functions on simulated signals; re-stamped per send."""

    def __init__(self) -> None:
        import numpy as np

        from uns_featurizer import SLOW_UNITS, slow_features, waveform_features
        from uns_simulator import Machine as Sim

        s = _featurizer()
        self.window_ms = round(s.waveform.window / 10)
        self.slow_window_ms = round(s.slow.window_s * 1000)
        self.features: dict[str, list[Metric]] = {}
        self.slow: dict[str, tuple[list[Metric], dict[str, SignalWindow]]] = {}
        self.scores: dict[tuple[str, str], tuple[list[Metric], ModelRef]] = {}
        self.births: dict[str, dict[str, list[MetricDef]]] = {}
        self.sizes: dict[str, int] = {}
        self._np = np
        self._slow_features = slow_features
        self._waveform_features = waveform_features
        self._slow_units = SLOW_UNITS
        self._sim = Sim
        self._settings = s

    def ensure(self, asset: str) -> None:
        if asset in self.births:
            return
        np, s = self._np, self._settings
        sim = self._sim(asset, 7)
        defs: list[MetricDef] = []
        if has_vibration(asset):
            x = sim.vibration(s.waveform.window)
            feats = self._waveform_features(
                x,
                10_000.0,
                bands=tuple(s.waveform.bands),
                shaft_hz=25.0,
                envelope_band=s.waveform.envelope_band,
            )
            self.features[asset] = [
                Metric(name=f"vibration.{k}", value=round(v, 9)) for k, v in feats.items()
            ]
            defs += [
                MetricDef(name=m.name, datatype="double", unit="g", source="featurizer:vibration")
                for m in self.features[asset]
            ]
        tags = slow_tags(asset)
        n = round(s.slow.window_s * 10)  # 10 samples/s over the window
        ts = np.arange(n, dtype=np.float64) * 100.0
        rng = np.random.default_rng(3)
        metrics, signals = [], {}
        for i, (tag, unit) in enumerate(tags):
            feats = self._slow_features(ts, 20.0 + i + rng.normal(0, 0.1, n))
            metrics += [Metric(name=f"{tag}.{k}", value=round(v, 9)) for k, v in feats.items()]
            signals[tag] = SignalWindow(good=n, total=n, seq_first=1 + i, seq_last=(n + i) % 256)
            defs += [
                MetricDef(
                    name=f"{tag}.{k}",
                    datatype="double",
                    unit=unit,
                    description=f"{self._slow_units[k][1]} of {tag}",
                    source=f"featurizer:{tag}",
                )
                for k in feats
            ]
        self.slow[asset] = metrics, signals
        births = {"features": defs}
        score_defs = []
        for kind, card in _models(asset).items():
            names = ["anomaly_score", "anomaly_threshold"] if kind == "anomaly" else ["rul"]
            names += [f"contribution.{f}" for f in card["features"]] if kind == "anomaly" else []
            values = [Metric(name=n, value=round(0.8 + 0.01 * j, 6)) for j, n in enumerate(names)]
            ref = ModelRef(name=card["name"], version=card["version"], sha256=card["sha256"])
            self.scores[(asset, kind)] = values, ref
            score_defs += [
                MetricDef(name=n, datatype="double", source=f"model:{card['name']}") for n in names
            ]
        if score_defs:
            births["scores"] = score_defs
        self.births[asset] = births

    def data(self, st: Stream, site: str, node_seq: int) -> tuple[str, bytes]:
        """The topic and payload of one message of ``st``, stamped now."""
        t = now_ms()
        topic = f"{ENTERPRISE}/{site}/{st.device}"
        if st.kind == "features":
            w = Window(
                start=t - self.window_ms,
                end=t,
                good=10_000,
                total=10_000,
                seq_first=node_seq,
                seq_last=(node_seq + 9) % 256,
            )
            payload = encode(
                DeviceData(
                    ts=t, node="featurizer", seq=node_seq, metrics=self.features[st.asset], window=w
                )
            )
            return f"{topic}/features/data", payload
        if st.kind == "slow features":
            metrics, signals = self.slow[st.asset]
            n = sum(sw.total for sw in signals.values())
            w = Window(
                start=t - self.slow_window_ms,
                end=t,
                good=n,
                total=n,
                seq_first=node_seq,
                seq_last=(node_seq + 99) % 256,
            )
            payload = encode(
                DeviceData(
                    ts=t,
                    node="featurizer",
                    seq=node_seq,
                    metrics=metrics,
                    window=w,
                    signals=signals,
                )
            )
            return f"{topic}/features/data", payload
        if st.kind == "scores":
            values, ref = self.scores[(st.asset, st.model)]
            w = Window(start=t - self.window_ms, end=t, good=10_000, total=10_000)
            payload = encode(
                DeviceData(
                    ts=t, node="inference", seq=node_seq, metrics=values, window=w, model=ref
                )
            )
            return f"{topic}/scores/data", payload
        device = st.device.rsplit("/", 1)[-1]
        event = Event(
            ts=t,
            data_ts=t,
            id=f"{device}-anomaly-{t}-{node_seq:08x}",
            kind="anomaly",
            state="raised" if node_seq % 2 else "cleared",
            device=f"{ENTERPRISE}/{site}/{st.device}",
            started=t - 10_000,
            severity="warning",
            summary=f"Anomaly on {device}: score 5.2 above 4.8 for 10 s (vibration.env_bpfo,"
            " vibration.kurtosis, vibration.rms)",
            score=5.2,
            threshold=4.8,
            count=11,
            details={
                "model": f"{st.asset}-anomaly",
                "model_version": "1.0.0",
                "top_features": "vibration.env_bpfo,vibration.kurtosis,vibration.rms",
            },
        )
        return f"{topic}/events/anomaly", encode(event)

    def birth_messages(self, site: str, machines: list[Machine]) -> list[tuple[str, bytes]]:
        """What a box's bridge forwards first: its nodes' and devices' (retained) births."""
        t = now_ms()
        out = [
            (
                f"{ENTERPRISE}/{site}/_node/{node}/birth",
                encode(
                    NodeBirth(
                        ts=t,
                        node=node,
                        service=node.split("-")[0],
                        version="0.1.0",
                        bdseq=1,
                        host=f"{site}-edge",
                        metrics_url=f"http://{site}-edge:9400/metrics",
                    )
                ),
            )
            for node in BOX_NODES
        ]
        for m in machines:
            self.ensure(m.asset)
            for stream, defs in self.births[m.asset].items():
                node = "featurizer" if stream == "features" else "inference"
                path = f"{ENTERPRISE}/{site}/{m.device}"
                out.append(
                    (
                        f"{path}/{stream}/birth",
                        encode(
                            DeviceBirth(ts=t, node=node, device=path, bdseq=1, seq=0, metrics=defs)
                        ),
                    )
                )
        return out


def key(topic: str, payload: bytes) -> bytes:
    """What identifies a message at both ends (each payload is stamped: no two alike)."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=12).digest()


# ---- the boxes (in the load process) -------------------------------------------------------


def boxes(
    url: str, n: int, machines: int | None, seconds: float, protocol: int, seed: int = 1
) -> dict[str, Any]:
    """``n`` boxes, each one connection, sending their births, then their machines' streams
    for ``seconds`` (each stream at its own phase); the send time of every message."""
    return asyncio.run(_boxes(url, n, machines, seconds, protocol, seed))


async def _boxes(
    url: str, n: int, machines_per_box: int | None, seconds: float, protocol: int, seed: int
) -> dict[str, Any]:
    from contextlib import AsyncExitStack

    plant = plant_machines(machines_per_box)
    plan = streams(plant)
    payloads = _Payloads()
    for m in plant:
        payloads.ensure(m.asset)
    rng = random.Random(seed)
    sent: list[tuple[bytes, float]] = []
    kinds: dict[str, int] = {}
    nbytes = 0
    failed = 0
    lag_max = 0.0
    tasks: set[asyncio.Task[None]] = set()
    sites = [f"site-{b:03d}" for b in range(n)]
    uid = 0

    async with AsyncExitStack() as stack:
        buses = []
        for site in sites:  # each box's bridge: its own client id, its own session
            bus = await stack.enter_async_context(
                connect(
                    url,
                    client_id=f"{ENTERPRISE}-{site}-bridge",
                    protocol=5 if protocol == 5 else 4,
                    max_inflight=INFLIGHT,
                    publish_timeout_s=math.inf,
                )
            )
            buses.append((bus, asyncio.Semaphore(INFLIGHT)))

        async def publish(b: int, topic: str, payload: bytes, retain: bool) -> None:
            nonlocal failed, uid
            bus, window = buses[b]
            uid += 1
            props = {"uns-id": f"{sites[b]}-bridge-{uid}"} if protocol == 5 else None
            try:
                await bus.publish(topic, payload, qos=1, retain=retain, user_properties=props)
            except Exception:  # counted: the subscriber's count says what it cost
                failed += 1
            finally:
                window.release()

        async def send(b: int, kind: str, topic: str, payload: bytes, retain: bool = False) -> None:
            nonlocal nbytes
            await buses[b][1].acquire()  # the bridge's inflight window, in journal order
            sent.append((key(topic, payload), time.monotonic()))
            kinds[kind] = kinds.get(kind, 0) + 1
            nbytes += len(payload)
            task = asyncio.create_task(publish(b, topic, payload, retain))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        t_first = time.monotonic()
        for b, site in enumerate(sites):
            for topic, payload in payloads.birth_messages(site, plant):
                await send(b, "births", topic, payload, retain=True)
        while tasks:  # the births are in (retained) before the streams start, as at a box's
            await asyncio.gather(*list(tasks))  # start: a burst, not the steady state
        t_births = time.monotonic()
        start = t_births + 0.2
        end = start + seconds
        queue: list[tuple[float, int, int, int]] = []
        for b in range(n):
            for i, st in enumerate(plan):
                queue.append((start + rng.uniform(0, st.period_s), b * len(plan) + i, b, i))
        heapq.heapify(queue)
        seqs = [0] * n
        while queue:
            due, order, b, i = heapq.heappop(queue)
            if due >= end:
                break
            ahead = due - time.monotonic()
            if ahead > 0.001:
                await asyncio.sleep(ahead)
            else:
                lag_max = max(lag_max, -ahead)
            st = plan[i]
            seqs[b] = next_seq(seqs[b])
            topic, payload = payloads.data(st, sites[b], seqs[b])
            await send(b, st.kind, topic, payload)
            heapq.heappush(queue, (due + st.period_s, order, b, i))
        t_last = time.monotonic()
        while tasks:  # every PUBACK in before the connections close
            await asyncio.gather(*list(tasks))
        t_acked = time.monotonic()
    return {
        "sent": sent,
        "kinds": kinds,
        "bytes": nbytes,
        "failed": failed,
        "t_first": t_first,
        "t_start": start,
        "births_s": t_births - t_first,
        "t_last": t_last,
        "t_acked": t_acked,
        "lag_max_s": lag_max,
        "offered_per_s": messages_per_s(plant, events_per_hour=EVENTS_PER_MACHINE_HOUR) * n,
        "machines": len(plant) * n,
    }


# ---- the central consumer and the rows -----------------------------------------------------


class Consumer:
    """The enterprise's subscriber on the central broker: every message of every box, QoS 1,
    by the key the boxes sent it under; arrival times."""

    def __init__(self, url: str, protocol: int) -> None:
        self.url = url
        self.protocol = protocol
        self.arrived: dict[bytes, float] = {}
        self.duplicates = 0
        self.subscribed = asyncio.Event()
        self.moved = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Consumer:
        self.task = await running_once(self._run(), self.subscribed)
        return self

    async def _run(self) -> None:
        async with connect(
            self.url,
            client_id=f"bench-central-{time.monotonic_ns()}",
            protocol=5 if self.protocol == 5 else 4,
        ) as bus:
            await bus.subscribe(f"{ENTERPRISE}/#", qos=1)
            self.subscribed.set()
            async for message in bus.messages():
                now = time.monotonic()
                k = key(message.topic, message.payload)
                if k in self.arrived:
                    self.duplicates += 1
                else:
                    self.arrived[k] = now
                self.moved.set()

    async def settle(self, want: set[bytes], idle_s: float = 5.0) -> None:
        """Until every key in ``want`` arrived or nothing arrived for ``idle_s``."""
        while not want.issubset(self.arrived.keys()):
            self.moved.clear()
            try:
                await asyncio.wait_for(self.moved.wait(), idle_s)
            except TimeoutError:
                return

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


def plan(ctx: Context) -> list[tuple[str, int]]:
    """(broker, boxes) of each row: the levels asked for on the brokers asked for, else
    every level on amqtt and on Mosquitto where installed (quick: amqtt)."""
    from uns_bench.broker import _mosquitto_installed

    levels = ctx.boxes or (QUICK_LEVELS if ctx.quick else LEVELS)
    if ctx.brokers:
        on: tuple[str, ...] = ctx.brokers
    elif ctx.quick:
        on = ("amqtt",)
    else:
        on = ("amqtt", "mosquitto") if _mosquitto_installed() else ("amqtt",)
    return [(b, n) for b in on for n in levels]


async def run(ctx: Context) -> list[Row]:
    seconds = 3.0 if ctx.quick else 20.0
    per_box = ctx.box_machines
    plant = plant_machines(per_box)
    rate = messages_per_s(plant)
    size = f"{len(plant)} machines a box" + ("" if per_box else " (the example plant)")
    ctx.say(f"  {size}: {rate:.2f} msgs/s a box ({rate / len(plant):.2f} a machine), births apart")
    rows = []
    for broker, n in plan(ctx):
        protocol = 4 if broker == "amqtt" else 5  # amqtt speaks MQTT 3.1.1 only
        runs = []
        for _ in range(ctx.repeats):
            procs = Procs(ctx.workdir)
            try:
                proc, url = procs.broker() if broker == "amqtt" else procs.mosquitto("central")
                await wait_broker(url)
                runs.append(await _once(ctx, url, proc.pid, n, per_box, seconds, protocol))
            finally:
                procs.stop()
        row = summarise(
            "8 boxes",
            f"{n} boxes" + ("" if broker == "amqtt" else f" on {BROKER_NAMES[broker]}"),
            f"{n} x {size} ({n * len(plant):,} machines, {n * rate:,.0f} msgs/s offered),"
            f" QoS 1{', MQTT 5 + uns-id' if protocol == 5 else ''}, {seconds:g} s",
            runs,
        )
        row.level, row.unit, row.series = n, "boxes", BROKER_NAMES[broker]
        row.limits = {"latency p99 ms": P99_TARGET_MS}
        row.rate, row.kind = "msgs/s", "slow"  # 0.4-4 kB messages: like a slow-tag one
        f = row.figures
        ctx.say(
            f"  {row.case}: lost {row.lost}, {f['msgs/s']:,.0f} msgs/s, p50"
            f" {f['latency p50 ms']:.1f} ms p99 {f['latency p99 ms']:.1f} ms, cores {row.cpu_s}"
        )
        rows.append(row)
    return rows


async def _once(
    ctx: Context,
    url: str,
    broker_pid: int,
    n: int,
    per_box: int | None,
    seconds: float,
    protocol: int,
) -> dict[str, Any]:
    import os

    consumer = await Consumer(url, protocol).start()
    await in_process(os.getpid)  # the load process exists before the sampler looks for it
    pids = {"broker": broker_pid, "consumer": os.getpid()}
    if (pid := load_pid()) is not None:
        pids["boxes"] = pid
    async with Sampler(pids) as sampler:
        sent = await in_process(boxes, url, n, per_box, seconds, protocol)
        want = {k for k, _ in sent["sent"]}
        await consumer.settle(want)
        t_end = max(
            [consumer.arrived[k] for k in want if k in consumer.arrived], default=sent["t_last"]
        )
    await consumer.stop()
    # the steady state: what the streams sent after the births (a start's burst) were in
    latencies = [
        (consumer.arrived[k] - t) * 1000
        for k, t in sent["sent"]
        if k in consumer.arrived and t >= sent["t_start"]
    ]
    arrived = sum(1 for k in want if k in consumer.arrived)
    steady = [
        consumer.arrived[k]
        for k, t in sent["sent"]
        if k in consumer.arrived and t >= sent["t_start"]
    ]
    # a stream's first message comes within its period of the start: short runs offer more
    # than the plan's rate, so the offered rate is what was sent after the births
    offered = sum(1 for _, t in sent["sent"] if t >= sent["t_start"])
    lost = len(want) - arrived
    span = max(t_end - sent["t_start"], 1e-9)
    notes = []
    if sent["lag_max_s"] > 0.1:
        notes.append(f"the boxes' generator fell {sent['lag_max_s']:.2f} s behind its schedule")
    if sent["failed"]:
        notes.append(f"{sent['failed']} publishes failed at the boxes")
    if consumer.duplicates:
        notes.append(f"{consumer.duplicates} duplicates at the consumer (QoS 1 resends)")
    return {
        "lost": lost,
        "figures": {
            "msgs/s": round(len(steady) / span),
            "offered msgs/s": round(offered / max(sent["t_last"] - sent["t_start"], 1e-9)),
            "KB/s": round(sent["bytes"] / max(sent["t_last"] - sent["t_first"], 1e-9) / 1e3, 1),
            "latency p50 ms": round(percentile(latencies, 0.5), 1),
            "latency p99 ms": round(percentile(latencies, 0.99), 1),
            "births": sent["kinds"].get("births", 0),
            "births in s": round(sent["births_s"], 2),
            "events": sent["kinds"].get("events", 0),
            "connections": n,
        },
        "cpu": sampler.cores(sent["t_start"], t_end),
        "rss": sampler.peak_rss(),
        "notes": notes,
    }
