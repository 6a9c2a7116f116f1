"""Scenario 7, Sparkplug B: what the edge node costs, and what the adapter carries.

* north: ``uns run sparkplug`` mirrors the 40-machine example load (each machine: a raw
  message of 10 slow tags, a features message of 8 features and a scores message of 2
  scores, each once a second) as DDATA. Its CPU is the added CPU; the added latency is,
  per message, when its DDATA arrived minus when the same namespace message arrived, both
  at one subscriber (the orchestrator), matched by device, stream and source timestamp.
* south: an edge node (the load process, with the package's own encoder) publishes DDATA
  of 40 devices x 10 metrics by alias at 20 messages/s each; ``uns run sparkplug-adapter``
  puts them into the namespace: values/s arriving there, and its CPU.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uns import DeviceBirth, DeviceData, DevicePath, Message, Metric, MetricDef, decode, now_ms
from uns import connect as bus_connect
from uns.payloads import encode
from uns_bench import config, load
from uns_bench.context import Context, Receiver
from uns_bench.procs import Procs, in_process, load_pid, metric_sum, wait_broker, wait_metric
from uns_bench.report import Row, percentile, summarise
from uns_bench.sampler import Sampler
from uns_sparkplug import DOUBLE, INT64, decode_payload, device_id, new_payload, sparkplug_topic

ENTERPRISE, SITE = "bench", "pune"
MACHINES, QUICK_MACHINES = 40, 4
STREAMS = {"raw": 10, "features": 8, "scores": 2}
"""Metrics per message of each stream; one message per stream per machine per second."""
SOUTH_TAGS, SOUTH_RATE, QUICK_SOUTH_RATE = 10, 20.0, 5.0


async def run(ctx: Context) -> list[Row]:
    return [await _north(ctx), await _south(ctx)]


# ---- north ---------------------------------------------------------------------------


def north_load(url: str, devices: list[str], seconds: float) -> dict[str, Any]:
    """The example load into the namespace: births, then a message per stream per device
    per second (spread over the second)."""
    return asyncio.run(_north_load(url, devices, seconds))


async def _north_load(url: str, devices: list[str], seconds: float) -> dict[str, Any]:
    sent = values = 0
    async with bus_connect(url, client_id=f"bench-spb-load-{time.monotonic_ns()}") as bus:
        for d in devices:
            for stream, n in STREAMS.items():
                defs = [MetricDef(name=f"{stream[0]}{k}", datatype="double") for k in range(n)]
                birth = DeviceBirth(
                    ts=now_ms(), node=load.NODE, device=d, bdseq=0, seq=0, metrics=defs
                )
                await bus.publish(f"{d}/{stream}/birth", encode(birth), qos=1, retain=True)
        await asyncio.sleep(1.0)  # the edge node's DBIRTHs
        start = time.monotonic() + 0.1
        t_first = 0.0
        slots = [(d, s) for d in devices for s in STREAMS]
        for tick in range(max(1, round(seconds))):
            for i, (d, stream) in enumerate(slots):
                ahead = start + tick + i / len(slots) - time.monotonic()
                if ahead > 0.0005:
                    await asyncio.sleep(ahead)
                ts = now_ms()
                metrics = [
                    Metric(name=f"{stream[0]}{k}", value=tick + k / 10, ts=ts)
                    for k in range(STREAMS[stream])
                ]
                data = DeviceData(ts=ts, node=load.NODE, seq=(sent % 255) + 1, metrics=metrics)
                if not t_first:
                    t_first = time.monotonic()
                await bus.publish(f"{d}/{stream}/data", encode(data), qos=0)
                sent += 1
                values += len(metrics)
        t_last = time.monotonic()
        await asyncio.sleep(0.2)
    return {"messages": sent, "values": values, "t_first": t_first, "t_last": t_last}


class _Pairs:
    """Arrivals of each namespace message and of its DDATA, matched."""

    def __init__(self) -> None:
        self.namespace: dict[tuple[str, str, int], float] = {}
        self.added_ms: list[float] = []
        self.spb_ms: list[float] = []
        self.ns_ms: list[float] = []
        self.values = 0
        self.counting = False

    def on_namespace(self, message: Message, now: float) -> None:
        if not message.topic.endswith("/data"):
            return
        levels = message.topic.split("/")
        data: DeviceData = decode(message.payload, DeviceData)
        path = DevicePath(*levels[:6])
        self.namespace[(device_id(path), levels[6], data.ts)] = time.time()
        if self.counting:
            self.ns_ms.append(time.time() * 1000 - data.ts)

    def on_sparkplug(self, message: Message, now: float) -> None:
        if "/DDATA/" not in message.topic:
            return
        arrived = time.time()
        payload = decode_payload(message.payload)
        device = message.topic.rsplit("/", 1)[1]
        if not self.counting:
            return
        self.values += len(payload.metrics)
        ts = payload.metrics[0].timestamp if payload.metrics else 0
        self.spb_ms.append(arrived * 1000 - ts)
        for stream in STREAMS:
            seen = self.namespace.pop((device, stream, ts), None)
            if seen is not None:
                self.added_ms.append((arrived - seen) * 1000)
                break


async def _north(ctx: Context) -> Row:
    seconds = 3.0 if ctx.quick else 10.0
    machines = QUICK_MACHINES if ctx.quick else MACHINES
    devices = load.device_paths(ENTERPRISE, machines)
    procs = Procs(ctx.workdir)
    runs = []
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        cfg = str(
            config.write(ctx.workdir, "sparkplug-north", devices, {"sparkplug": {"enabled": True}})
        )
        common = ("--config", cfg, "--broker", url, "--log-level", "WARNING")
        north = procs.uns("sparkplug", "run", "sparkplug", *common, metrics=True)
        await wait_metric(
            north, lambda s: metric_sum(s, "uns_sparkplug_connected") == 1, what="born"
        )
        for _ in range(ctx.repeats):
            pairs = _Pairs()
            ns = await Receiver(
                url, f"{ENTERPRISE}/{SITE}/+/+/+/+/+/data", keep=pairs.on_namespace
            ).start()
            spb = await Receiver(
                url, f"spBv1.0/{ENTERPRISE}/DDATA/{SITE}/+", keep=pairs.on_sparkplug
            ).start()
            pids = {"broker": broker.pid, "sparkplug": north.pid}
            if (pid := load_pid()) is not None:
                pids["load"] = pid
            pairs.counting = True
            async with Sampler(pids) as sampler:
                sent = await in_process(north_load, url, devices, seconds)
                await spb.settle(idle_s=2.0, limit_s=30.0)
            await ns.stop()
            pairs.counting = False
            span = max(sent["t_last"] - sent["t_first"], 1e-9)
            runs.append(
                {
                    "lost": max(sent["values"] - pairs.values, 0),
                    "figures": {
                        "values/s mirrored": round(min(pairs.values, sent["values"]) / span),
                        "namespace msgs/s": round(sent["messages"] / span),
                        "added latency p50 ms": round(percentile(pairs.added_ms, 0.5), 2),
                        "added latency p99 ms": round(percentile(pairs.added_ms, 0.99), 2),
                        "namespace latency p50 ms": round(percentile(pairs.ns_ms, 0.5), 1),
                        "DDATA latency p50 ms": round(percentile(pairs.spb_ms, 0.5), 1),
                        "DDATA latency p99 ms": round(percentile(pairs.spb_ms, 0.99), 1),
                    },
                    "cpu": sampler.cores(sent["t_first"], sent["t_last"]),
                    "rss": sampler.peak_rss(),
                }
            )
    finally:
        procs.stop()
    row = summarise(
        "7 sparkplug",
        "namespace -> sparkplug edge node (north)",
        f"{machines} machines x (10 slow tags + 8 features + 2 scores) x 1 msg/s, {seconds:g} s",
        runs,
    )
    row.notes.append(
        "added CPU = the sparkplug process; added latency = DDATA arrival minus the same"
        " namespace message's arrival at one subscriber (ms clock)"
    )
    f = row.figures
    ctx.say(
        f"  north: {f['values/s mirrored']:,.0f} values/s, added latency p50"
        f" {f['added latency p50 ms']} ms, p99 {f['added latency p99 ms']} ms,"
        f" {row.cpu_s.get('sparkplug', 0):.3f} cores, lost {row.lost}"
    )
    return row


# ---- south ---------------------------------------------------------------------------


def south_load(url: str, devices: int, tags: int, rate: float, seconds: float) -> dict[str, Any]:
    """An edge node: NBIRTH, a DBIRTH per device, then DDATA by alias."""
    return asyncio.run(_south_load(url, devices, tags, rate, seconds))


async def _south_load(
    url: str, devices: int, tags: int, rate: float, seconds: float
) -> dict[str, Any]:
    group, edge = "benchgroup", "edge-1"
    seq = 0
    sent = values = 0

    def next_seq() -> int:
        nonlocal seq
        seq = (seq + 1) % 256
        return seq

    async with bus_connect(url, client_id=f"bench-spb-edge-{time.monotonic_ns()}") as bus:
        nbirth = new_payload(now_ms(), 0)
        nbirth.metrics.add(name="bdSeq", datatype=INT64, long_value=0)
        await bus.publish(sparkplug_topic(group, "NBIRTH", edge), nbirth.SerializeToString())
        for d in range(devices):
            birth = new_payload(now_ms(), next_seq())
            for k in range(tags):
                birth.metrics.add(
                    name=f"tag{k}", alias=d * tags + k + 1, datatype=DOUBLE, double_value=0.0
                )
            await bus.publish(
                sparkplug_topic(group, "DBIRTH", edge, f"dev-{d:03d}"), birth.SerializeToString()
            )
        await asyncio.sleep(1.0)  # the adapter's births into the namespace
        start = time.monotonic() + 0.1
        t_first = 0.0
        period = 1.0 / rate
        for tick in range(max(1, round(seconds * rate))):
            for d in range(devices):
                ahead = start + (tick + d / devices) * period - time.monotonic()
                if ahead > 0.0005:
                    await asyncio.sleep(ahead)
                ts = now_ms()
                data = new_payload(ts, next_seq())
                for k in range(tags):
                    data.metrics.add(
                        alias=d * tags + k + 1, timestamp=ts, double_value=tick + k / 10
                    )
                if not t_first:
                    t_first = time.monotonic()
                await bus.publish(
                    sparkplug_topic(group, "DDATA", edge, f"dev-{d:03d}"), data.SerializeToString()
                )
                sent += 1
                values += tags
        t_last = time.monotonic()
        await asyncio.sleep(0.2)
    return {"messages": sent, "values": values, "t_first": t_first, "t_last": t_last}


class _Counted:
    def __init__(self) -> None:
        self.values = 0

    def __call__(self, message: Message, now: float) -> None:
        if message.topic.endswith("/raw/data"):
            self.values += len(decode(message.payload, DeviceData).metrics)


async def _south(ctx: Context) -> Row:
    seconds = 3.0 if ctx.quick else 10.0
    devices = QUICK_MACHINES if ctx.quick else MACHINES
    rate = QUICK_SOUTH_RATE if ctx.quick else SOUTH_RATE
    procs = Procs(ctx.workdir)
    runs = []
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        cfg = str(
            config.write(
                ctx.workdir,
                "sparkplug-south",
                load.device_paths(ENTERPRISE, 1),
                {"sparkplug-adapter": {"enabled": True, "rebirth_request_interval_s": 1.0}},
            )
        )
        common = ("--config", cfg, "--broker", url, "--log-level", "WARNING")
        adapter = procs.uns("sparkplug-adapter", "run", "sparkplug-adapter", *common, metrics=True)
        await wait_metric(adapter, lambda s: metric_sum(s, "uns_connected") == 1, what="connected")
        for _ in range(ctx.repeats):
            counted = _Counted()
            receiver = await Receiver(
                url, f"{ENTERPRISE}/{SITE}/sparkplug/+/+/+/raw/data", keep=counted
            ).start()
            pids = {"broker": broker.pid, "sparkplug-adapter": adapter.pid}
            if (pid := load_pid()) is not None:
                pids["load"] = pid
            async with Sampler(pids) as sampler:
                sent = await in_process(south_load, url, devices, SOUTH_TAGS, rate, seconds)
                await receiver.settle(idle_s=2.0, limit_s=30.0)
            span = max(sent["t_last"] - sent["t_first"], 1e-9)
            births = devices * SOUTH_TAGS  # each DBIRTH's values
            got = max(counted.values - births, 0)
            runs.append(
                {
                    "lost": max(sent["values"] - got, 0),
                    "figures": {
                        "values/s into the namespace": round(min(got, sent["values"]) / span),
                        "offered values/s": round(sent["values"] / span),
                        "DDATA/s": round(sent["messages"] / span),
                    },
                    "cpu": sampler.cores(sent["t_first"], sent["t_last"]),
                    "rss": sampler.peak_rss(),
                }
            )
    finally:
        procs.stop()
    row = summarise(
        "7 sparkplug",
        "sparkplug edge node -> adapter -> namespace (south)",
        f"{devices} devices x {SOUTH_TAGS} metrics by alias x {rate:g} msg/s, {seconds:g} s",
        runs,
    )
    ctx.say(
        f"  south: {row.figures['values/s into the namespace']:,.0f} values/s,"
        f" {row.cpu_s.get('sparkplug-adapter', 0):.3f} cores, lost {row.lost}"
    )
    return row
