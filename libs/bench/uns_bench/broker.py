"""Scenario 1, the broker ceiling: raw pass-through of the embedded broker and of Mosquitto,
with the pipeline's client library (aiomqtt through `uns.bus`) and its message sizes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from uns_bench import load
from uns_bench.context import Context, Receiver
from uns_bench.procs import Procs, in_process, load_pid, wait_broker
from uns_bench.report import Row, summarise
from uns_bench.sampler import Sampler

KINDS = ("block", "slow")
"""A 1,000-sample vibration block (~5.5 kB) and one device's ten slow tags (~0.5 kB)."""
BROKERS = ("amqtt", "mosquitto")
QUICK_COUNTS = {"block": 2_000, "slow": 4_000}


async def run(ctx: Context) -> list[Row]:
    counts = QUICK_COUNTS if ctx.quick else {"block": 20_000, "slow": 40_000}
    return await _ceilings(ctx, BROKERS, counts, ctx.repeats)


async def quick_ceiling(ctx: Context) -> None:
    """The ceilings at the quick counts, once, for a run without the broker scenario: its
    rows can still say how near the broker's limit they ran. A broker that is not
    installed (Mosquitto) has no ceiling: its ratios are n/a."""
    have = [b for b in BROKERS if b != "mosquitto" or _mosquitto_installed()]
    rows = await _ceilings(ctx, tuple(have), QUICK_COUNTS, 1)
    for row in rows:
        if row.lost:
            ctx.say(f"  {row.case}: lost {row.lost} measuring the ceiling")


def _mosquitto_installed() -> bool:
    return Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto").exists()


async def _ceilings(
    ctx: Context, brokers: tuple[str, ...], counts: dict[str, int], repeats: int
) -> list[Row]:
    payloads = {"block": load.block_payload(0), "slow": load.slow_payload(10)}
    rows = []
    for broker in brokers:
        procs = Procs(ctx.workdir)
        try:
            proc, url = procs.broker("broker") if broker == "amqtt" else procs.mosquitto()
            await wait_broker(url)
            for kind in KINDS:
                payload, n = payloads[kind], counts[kind]
                runs = [
                    await _once(ctx, url, proc.pid, payload, n, f"bench/ceiling/{kind}/{r}")
                    for r in range(repeats)
                ]
                row = summarise(
                    "1 broker ceiling",
                    f"{broker}, {kind} {len(payload):,} B",
                    f"{n:,} msgs QoS 0, 1 publisher, 1 subscriber",
                    runs,
                )
                ctx.ceiling[f"{broker}/{kind}"] = row.figures["msgs/s"]
                ctx.say(f"  {broker} {kind}: {row.figures['msgs/s']:,.0f} msgs/s, lost {row.lost}")
                rows.append(row)
        finally:
            procs.stop()
    return rows


async def _once(
    ctx: Context, url: str, broker_pid: int, payload: bytes, n: int, topic: str
) -> dict[str, Any]:
    receiver = await Receiver(url, topic, expect=n).start()
    pid = load_pid()
    pids = {"broker": broker_pid, **({"load": pid} if pid else {})}
    async with Sampler(pids) as sampler:
        sent = await in_process(load.flood, url, topic, payload, n)
        await receiver.settle(idle_s=3.0)
    t0, t1 = sent["t_start"], receiver.t_last or sent["t_end"]
    rate = receiver.count / max(t1 - t0, 1e-9)
    return {
        "lost": sent["sent"] - receiver.count,
        "figures": {
            "msgs/s": round(rate),
            "MB/s": round(rate * len(payload) / 1e6, 2),
            "publisher msgs/s": round(sent["sent"] / max(sent["t_end"] - t0, 1e-9)),
        },
        "cpu": sampler.cores(t0, t1),
        "rss": sampler.peak_rss(),
    }
