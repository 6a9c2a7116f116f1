"""Scenario 1, the broker ceiling: raw pass-through of the embedded broker and of Mosquitto,
with the pipeline's client library (aiomqtt through `uns.bus`) and its message sizes."""

from __future__ import annotations

from typing import Any

from uns_bench import load
from uns_bench.context import Context, Receiver
from uns_bench.procs import Procs, in_process, load_pid, wait_broker
from uns_bench.report import Row, summarise
from uns_bench.sampler import Sampler

KINDS = ("block", "slow")
"""A 1,000-sample vibration block (~5.5 kB) and one device's ten slow tags (~0.5 kB)."""


async def run(ctx: Context) -> list[Row]:
    payloads = {"block": load.block_payload(0), "slow": load.slow_payload(10)}
    counts = {"block": 2_000, "slow": 4_000} if ctx.quick else {"block": 20_000, "slow": 40_000}
    rows = []
    for broker in ("amqtt", "mosquitto"):
        procs = Procs(ctx.workdir)
        try:
            proc, url = procs.broker("broker") if broker == "amqtt" else procs.mosquitto()
            await wait_broker(url)
            for kind in KINDS:
                payload, n = payloads[kind], counts[kind]
                runs = [
                    await _once(ctx, url, proc.pid, payload, n, f"bench/ceiling/{kind}/{r}")
                    for r in range(ctx.repeats)
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
