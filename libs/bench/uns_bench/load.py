"""What the load process runs: publishers that pace themselves and count what they sent.

Functions here are called through `uns_bench.procs.in_process` (a separate interpreter),
take plain arguments and return plain dicts. Times are ``time.monotonic()``, the one
clock every process of the machine shares (CLOCK_MONOTONIC), so the orchestrator can
match a publish here with a receipt there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from uns import (
    DeviceBirth,
    DeviceData,
    Metric,
    MetricDef,
    Waveform,
    connect,
    encode,
    now_ms,
)
from uns.payloads import next_seq
from uns.topics import DevicePath

BLOCK = 1000
"""Samples per waveform block, as the simulator and the OPC UA adapter send them."""
RATE_HZ = 10_000.0
WINDOW_BLOCKS = 10
"""Blocks per featurizer window (10,000 samples: the example plant's 1 s window)."""
NODE = "bench-load"


def press_tags() -> list[tuple[str, str]]:
    """(name, unit) of a press's ten slow tags, as the simulator's catalogue names them."""
    from uns_simulator import ASSETS

    return [(t.name, t.unit) for t in ASSETS["press"]]


def block_payload(device_index: int, n: int = 0) -> bytes:
    """One encoded raw message carrying a 1,000-sample vibration block (the pipeline's)."""
    from uns_simulator import Machine

    samples = Machine("press", 1000 + device_index).vibration(BLOCK)
    wave = Waveform.from_values(samples, t0_us=now_ms() * 1000, rate_hz=RATE_HZ, block=n)
    return encode(DeviceData(ts=now_ms(), node=NODE, seq=0, metrics=[Metric("vibration", wave)]))


def slow_payload(values: int = 10) -> bytes:
    """One encoded raw message of a device's slow tags (report by exception, batched)."""
    tags = press_tags()
    metrics = [
        Metric(name=f"{tags[i % len(tags)][0]}{'' if i < len(tags) else i}", value=20.0 + i * 0.37)
        for i in range(values)
    ]
    return encode(DeviceData(ts=now_ms(), node=NODE, seq=0, metrics=metrics))


# ---- broker ceiling ------------------------------------------------------------------


def flood(url: str, topic: str, payload: bytes, n: int, connections: int = 1) -> dict[str, Any]:
    """Publish ``n`` copies of ``payload`` (QoS 0) as fast as the client goes."""
    return asyncio.run(_flood(url, topic, payload, n, connections))


async def _flood(url: str, topic: str, payload: bytes, n: int, connections: int) -> dict[str, Any]:
    sent = 0
    started = ended = 0.0

    async def one(k: int, count: int) -> None:
        nonlocal sent, started, ended
        async with connect(url, client_id=f"bench-flood-{k}-{time.monotonic_ns()}") as bus:
            started = started or time.monotonic()
            for _ in range(count):
                await bus.publish(topic, payload)
                sent += 1
            ended = time.monotonic()
            await asyncio.sleep(0.2)  # let paho write its buffer out before disconnecting

    per = [n // connections + (1 if k < n % connections else 0) for k in range(connections)]
    await asyncio.gather(*(one(k, c) for k, c in enumerate(per)))
    return {"sent": sent, "t_start": started, "t_end": ended}


# ---- devices at a fixed rate ---------------------------------------------------------


def _raw_birth(path: str, tags: list[tuple[str, str]], waveform: bool) -> bytes:
    metrics = [MetricDef(name=n, datatype="double", unit=u) for n, u in tags]
    if waveform:
        metrics.insert(
            0, MetricDef(name="vibration", datatype="waveform", unit="g", rate_hz=RATE_HZ)
        )
    return encode(DeviceBirth(ts=now_ms(), node=NODE, device=path, bdseq=0, seq=0, metrics=metrics))


class _Seq:
    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value = next_seq(self.value)
        return self.value


def vibration(
    url: str, devices: list[str], seconds: float, *, slow_every_s: float = 1.0
) -> dict[str, Any]:
    """Every device: a 10 kHz vibration block every 100 ms (spread evenly over the period,
    as independent machines are) and its ten slow tags every ``slow_every_s``, for
    ``seconds`` (a whole number of featurizer windows)."""
    return asyncio.run(_vibration(url, devices, seconds, slow_every_s))


async def _vibration(
    url: str, devices: list[str], seconds: float, slow_every_s: float
) -> dict[str, Any]:
    from uns_simulator import Machine

    tags = press_tags()
    period = BLOCK / RATE_HZ
    blocks_per_device = max(1, round(seconds / period / WINDOW_BLOCKS)) * WINDOW_BLOCKS
    # a window of real signal per device, sent over and over (its features stay healthy)
    machines = [Machine("press", 1000 + i) for i in range(len(devices))]
    signals = [[m.vibration(BLOCK).astype("<f4").tobytes() for _ in range(10)] for m in machines]
    seq = _Seq()
    topics = [f"{d}/raw/data" for d in devices]
    windows: dict[str, float] = {}
    sent_blocks = sent_slow = 0
    lag_max = 0.0
    slow_every = max(1, round(slow_every_s / period))

    async with connect(url, client_id=f"{NODE}-{time.monotonic_ns()}") as bus:

        async def slow(i: int) -> None:
            nonlocal sent_slow
            readings = machines[i].readings()
            metrics = []
            for name, _unit in tags:
                value = readings.get(_STATE.get(name, name))
                v = value[0] if value is not None else 0.0
                metrics.append(Metric(name=name, value=float(v)))
            data = DeviceData(ts=now_ms(), node=NODE, seq=seq.next(), metrics=metrics)
            await bus.publish(topics[i], encode(data))
            sent_slow += 1

        for i, d in enumerate(devices):
            await bus.publish(f"{d}/raw/birth", _raw_birth(d, tags, True), qos=1, retain=True)
            await slow(i)
        await asyncio.sleep(0.5)  # the featurizer knows the speed before the first window
        base_us = (time.time_ns() // 1000 // 100_000 + 1) * 100_000
        start = time.monotonic() + 0.1
        m = len(devices)
        t_first = t_last = 0.0
        streamed = [[0.0, 0.0] for _ in range(m)]  # each device's first and last block
        # independent machines: each one's windows start at its own block (the featurizer
        # windows from the first block it sees), so windows complete spread over the second
        first = [round(i * WINDOW_BLOCKS / m) % WINDOW_BLOCKS for i in range(m)]
        for n in range(blocks_per_device + WINDOW_BLOCKS - 1):
            t0_us = base_us + n * round(period * 1e6)
            for i in range(m):
                if not first[i] <= n < first[i] + blocks_per_device:
                    continue
                last_of_window = (n - first[i] + 1) % WINDOW_BLOCKS == 0
                due = start + (n + i / m) * period
                ahead = due - time.monotonic()
                if ahead > 0.001:
                    await asyncio.sleep(ahead)
                else:
                    lag_max = max(lag_max, -ahead)
                wave = Waveform(t0_us=t0_us, rate_hz=RATE_HZ, samples=signals[i][n % 10], block=n)
                data = DeviceData(
                    ts=t0_us // 1000, node=NODE, seq=seq.next(), metrics=[Metric("vibration", wave)]
                )
                payload = encode(data)
                t_pub = time.monotonic()
                if not t_first:
                    t_first = t_pub
                streamed[i][0] = streamed[i][0] or t_pub
                streamed[i][1] = t_pub
                await bus.publish(topics[i], payload)
                sent_blocks += 1
                if last_of_window:
                    end_ms = (t0_us + round(period * 1e6)) // 1000
                    windows[f"{devices[i]}|{end_ms}"] = t_pub
                if n % slow_every == slow_every - 1:
                    machines[i].step(slow_every * period)
                    await slow(i)
        t_last = time.monotonic()
        await asyncio.sleep(0.2)
    return {
        "blocks": sent_blocks,
        "slow": sent_slow,
        "windows": windows,
        "t_first": t_first,
        "t_last": t_last,
        "lag_max_s": lag_max,
        "block_bytes": len(payload),
        # what the machines sent together while each streamed (the first and last windows
        # of the staggered machines overlap only partly)
        "blocks_per_s": sum((blocks_per_device - 1) / (b - a) for a, b in streamed if b > a),
    }


_STATE = {  # press tag name -> the machine model's quantity (uns_simulator.catalog)
    "bearing_temp": "bearing_temp",
    "oil_temp": "aux_temp",
    "hydraulic_pressure": "pressure",
    "motor_current": "current",
    "ram_tonnage": "load",
    "motor_speed": "speed",
    "stroke_rate": "rate",
    "stroke_count": "count",
    "run_state": "running",
    "overload": "overload",
}


def slow_tags(
    url: str, devices: list[str], tags_per_message: int, messages_per_s: float, seconds: float
) -> dict[str, Any]:
    """Slow tags through the raw namespace: every device sends one message of
    ``tags_per_message`` changed values ``messages_per_s`` times a second."""
    return asyncio.run(_slow_tags(url, devices, tags_per_message, messages_per_s, seconds))


async def _slow_tags(
    url: str, devices: list[str], per_message: int, rate: float, seconds: float
) -> dict[str, Any]:
    names = [f"tag_{k:03d}" for k in range(per_message)]
    seq = _Seq()
    sent = values = 0
    lag_max = 0.0
    period = 1.0 / rate
    ticks = max(1, round(seconds * rate))
    m = len(devices)
    async with connect(url, client_id=f"{NODE}-{time.monotonic_ns()}") as bus:
        for d in devices:
            await bus.publish(
                f"{d}/raw/birth",
                _raw_birth(d, [(n, "degC") for n in names], False),
                qos=1,
                retain=True,
            )
        await asyncio.sleep(0.3)
        start = time.monotonic() + 0.1
        base_ms = now_ms()
        t_first = 0.0
        for n in range(ticks):
            ts = base_ms + round(n * period * 1000)
            for i, d in enumerate(devices):
                due = start + (n + i / m) * period
                ahead = due - time.monotonic()
                if ahead > 0.001:
                    await asyncio.sleep(ahead)
                else:
                    lag_max = max(lag_max, -ahead)
                metrics = [
                    Metric(name=name, value=20.0 + ((n + k) % 50) * 0.1)
                    for k, name in enumerate(names)
                ]
                data = DeviceData(ts=ts, node=NODE, seq=seq.next(), metrics=metrics)
                if not t_first:
                    t_first = time.monotonic()
                await bus.publish(f"{d}/raw/data", msgspec.json.encode(data))
                sent += 1
                values += per_message
        t_last = time.monotonic()
        await asyncio.sleep(0.2)
    return {
        "messages": sent,
        "values": values,
        "t_first": t_first,
        "t_last": t_last,
        "lag_max_s": lag_max,
    }


def device_paths(enterprise: str, machines: int) -> list[str]:
    """``machines`` presses under one site, ten to a cell."""
    return [
        str(
            DevicePath(
                enterprise, "pune", "stamping", "line-1", f"cell-{i // 10:02d}", f"press-{i:03d}"
            )
        )
        for i in range(machines)
    ]
