"""Scenario 4, sensor to alert: a bearing fault injected in the simulator, read over OPC UA,
windowed, scored; the time from its onset to the inference's ``raised`` event."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uns import Command, Event, Message, connect, decode, encode, now_ms
from uns_bench import config
from uns_bench.context import Context, Receiver
from uns_bench.procs import Proc, Procs, free_port, wait_broker
from uns_bench.report import Row, summarise
from uns_bench.sampler import Sampler

ENTERPRISE = "bench"


async def run(ctx: Context) -> list[Row]:
    from uns_simulator import adapter_config, scaled_plant

    plant = [(p, a) for p, a in scaled_plant(6, enterprise=ENTERPRISE) if a == "press"]
    presses = [str(p) for p, _ in plant][: ctx.repeats]
    opcua_port = free_port()
    sections = adapter_config(
        plant,
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=free_port(),
        rate_hz=10_000.0,
    )
    services: dict[str, Any] = {
        "simulator": {"opcua": {"port": opcua_port}, "modbus": {"enabled": False}},
        "opcua-adapter": sections["opcua-adapter"],
    }
    min_raise = 0.0 if ctx.quick else None
    if min_raise is not None:  # quick: raise on the first breach (the card says 10 s)
        services["inference"] = {"thresholds": {"min_raise_s": min_raise}}
    procs = Procs(ctx.workdir)
    runs = []
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        cfg = config.write(ctx.workdir, "alert", [str(p) for p, _ in plant], services)
        common = ("--config", str(cfg), "--broker", url, "--log-level", "WARNING")
        running: dict[str, Proc] = {"broker": broker}
        for name in ("simulator", "opcua-adapter", "featurizer", "inference"):
            running[name] = procs.uns(name, "run", name, *common, metrics=True)
        await _scoring(url, [str(p) for p, _ in plant], running)
        card = _card_min_raise()
        for device in presses:
            runs.append(await _once(ctx, url, device, running, card if min_raise is None else 0))
    finally:
        procs.stop()
    row = summarise(
        "4 sensor to alert",
        "bearing wear -> anomaly raised",
        f"{len(plant)} presses over OPC UA, fault (severity 1, no ramp) on one at a time",
        runs,
    )
    f = row.figures
    ctx.say(
        f"  onset -> raised: {f['onset to raised s']:.2f} s (beyond window + persistence"
        f" {f['beyond window + persistence s']:.2f} s)"
    )
    return [row]


async def _scoring(
    url: str, presses: list[str], running: dict[str, Proc], timeout_s: float = 60
) -> None:
    """Until a score of every press has arrived: the fault's onset is timed from a pipeline
    that already reads, windows and scores that press (a score count summed over the
    presses could be reached by some of them while another is still being subscribed)."""
    scored: set[str] = set()
    every = asyncio.Event()

    def keep(message: Message, now: float) -> None:
        scored.add(message.topic.rsplit("/", 2)[0])
        if scored >= set(presses):
            every.set()

    receiver = await Receiver(url, f"{ENTERPRISE}/+/+/+/+/+/scores/data", keep=keep).start()
    waiter = asyncio.create_task(every.wait())
    try:
        deadline = time.monotonic() + timeout_s
        while not waiter.done():
            gone = [name for name, p in running.items() if not p.alive()]
            if gone or time.monotonic() > deadline:
                missing = ", ".join(p for p in presses if p not in scored)
                why = f"{', '.join(gone)} exited" if gone else f"none in {timeout_s:g} s"
                logs = ", ".join(str(p.log) for name, p in running.items() if name != "broker")
                raise RuntimeError(f"no score of {missing}: {why}; see {logs}")
            await asyncio.wait({waiter}, timeout=0.5)
    finally:
        waiter.cancel()
        await receiver.stop()


def _card_min_raise() -> float:
    from uns.config import REPO_ROOT
    from uns_inference.card import read

    slot = REPO_ROOT / "models" / "press" / "anomaly"
    card = read(slot / (slot / "current").read_text().strip() / "card.json")
    return card.thresholds.min_raise_s if card.thresholds else 0.0


async def _once(
    ctx: Context, url: str, device: str, running: dict[str, Any], min_raise_s: float
) -> dict[str, Any]:
    raised: list[float] = []
    seen = asyncio.Event()
    onset: list[Event] = []

    def keep(message: Message, now: float) -> None:
        if message.topic.endswith(("/events/anomaly", "/events/sim_fault")):
            event: Event = decode(message.payload, Event)
            if event.state != "raised":
                return
            if event.kind == "anomaly":
                raised.append(now_ms())
                seen.set()
            else:
                onset.append(event)

    receiver = await Receiver(url, f"{device}/#", keep=keep).start()
    pids = {name: p.pid for name, p in running.items()}
    async with Sampler(pids) as sampler:
        t0 = time.monotonic()
        async with connect(url, client_id=f"bench-alert-{time.monotonic_ns()}") as bus:
            command = Command(
                ts=now_ms(), name="fault", args={"kind": "bearing_wear", "severity": 1.0}
            )
            await bus.publish(f"{device}/cmd/fault", encode(command), qos=1)
        limit = 60 + min_raise_s
        try:
            await asyncio.wait_for(seen.wait(), limit)
        except TimeoutError:
            pass
        t1 = time.monotonic()
    await receiver.stop()
    if not raised or not onset:
        return {"lost": 1, "notes": [f"{device}: no anomaly raised within {limit:.0f} s"]}
    at = raised[0]
    total = (at - onset[0].started) / 1000
    window_s = 1.0
    return {
        "figures": {
            "onset to raised s": round(total, 2),
            "window s": window_s,
            "persistence (min_raise_s)": min_raise_s,
            "beyond window + persistence s": round(total - window_s - min_raise_s, 2),
        },
        "cpu": sampler.cores(t0, t1),
        "rss": sampler.peak_rss(),
    }
