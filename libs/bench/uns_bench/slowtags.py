"""Scenario 3, slow tags: tag values/s into the featurizer, report by exception.

* raw namespace path: the load process publishes each device's changed values batched in
  one message (what an adapter publishes), the featurizer windows every value;
* through the adapters: the simulator's OPC UA and Modbus servers, read by the OPC UA
  adapter (subscriptions) or the Modbus adapter (polling), into the featurizer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uns import DeviceData, Message, Waveform, decode
from uns.payloads import SEQ_MODULUS
from uns_bench import config, load
from uns_bench.context import Context, Receiver
from uns_bench.procs import Proc, Procs, in_process, load_pid, metric_sum, wait_broker, wait_metric
from uns_bench.report import Row, summarise
from uns_bench.sampler import Sampler

ENTERPRISE = "bench"
# (devices, tags per message, messages per second per device)
LEVELS = ((100, 50, 5), (100, 50, 10), (100, 100, 10), (200, 100, 10))
QUICK_LEVELS = ((10, 10, 5),)
PER_DEVICE = (100, 10)
"""Tags per message and messages/s of a device at a ``--machines`` level (1,000 values/s)."""
QUICK_PER_DEVICE = (10, 5)
ADAPTER_MACHINES = 40
ADAPTER_TICK_S = 0.05
"""The simulator updates every tag 20 times a second: each value changes, so each is sent."""
CEILING_UNITS = 50
CEILING_POLL_S = 0.001
"""The Modbus adapter's own ceiling: 50 units behind one endpoint polled as fast as it can,
every value published on every poll (a heartbeat shorter than the poll), so what it
publishes is what it read."""


async def run(ctx: Context) -> list[Row]:
    levels: tuple[tuple[int, int, float], ...] = QUICK_LEVELS if ctx.quick else LEVELS
    if ctx.machines:  # the devices asked for, each sending as many values as a default level
        per_message, rate = QUICK_PER_DEVICE if ctx.quick else PER_DEVICE
        levels = tuple((n, per_message, rate) for n in ctx.machines)
    rows = [await _raw(ctx, *level) for level in levels]
    for adapter in ("opcua-adapter", "modbus-adapter"):
        rows.append(await _adapter(ctx, adapter))
    rows.append(await _modbus_ceiling(ctx))
    return rows


def _processed(samples: dict[str, float]) -> float:
    """Raw messages the featurizer has handled (not merely received)."""
    return metric_sum(samples, "uns_handler_duration_seconds_count")


async def _raw(ctx: Context, devices_n: int, per_message: int, rate: float) -> Row:
    seconds = 2.0 if ctx.quick else 10.0
    procs = Procs(ctx.workdir)
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        devices = load.device_paths(ENTERPRISE, devices_n)
        cfg = str(config.write(ctx.workdir, f"slow-{devices_n}", devices))
        feat = procs.uns(
            "featurizer",
            *("run", "featurizer", "--config", cfg, "--broker", url, "--log-level", "WARNING"),
            metrics=True,
        )
        await wait_metric(feat, lambda s: metric_sum(s, "uns_connected") == 1, what="connected")
        runs = []
        for _ in range(ctx.repeats):
            before = await asyncio.to_thread(feat.metrics)
            pids = {"broker": broker.pid, "featurizer": feat.pid}
            if (pid := load_pid()) is not None:
                pids["load"] = pid
            async with Sampler(pids) as sampler:
                sent = await in_process(load.slow_tags, url, devices, per_message, rate, seconds)
                want = _processed(before) + sent["messages"] + devices_n
                done = await _until(feat, lambda s, want=want: _processed(s) >= want)
            handled = round(_processed(done) - _processed(before)) - devices_n  # births
            span = max(sent["t_last"] - sent["t_first"], 1e-9)
            t_end = time.monotonic()
            dropped = round(
                metric_sum(done, "uns_messages_dropped_total")
                - metric_sum(before, "uns_messages_dropped_total")
            )
            lost = max(sent["messages"] - handled, 0) * per_message
            msgs_per_s = sent["messages"] / span
            runs.append(
                {
                    "lost": lost,
                    "figures": {
                        "tag values/s": round(min(handled, sent["messages"]) * per_message / span),
                        "offered values/s": devices_n * per_message * rate,
                        "messages/s": round(msgs_per_s),
                        "catch-up s": round(max(t_end - sent["t_last"], 0.0), 2),
                    },
                    "cpu": sampler.cores(sent["t_first"], sent["t_last"]),
                    "rss": sampler.peak_rss(),
                    "notes": [f"{dropped} messages dropped by the featurizer"] if dropped else [],
                }
            )
    finally:
        procs.stop()
    row = summarise(
        "3 slow tags",
        "raw namespace -> featurizer",
        f"{devices_n} devices x {per_message} tags/msg x {rate:g} msg/s, {seconds:g} s",
        runs,
    )
    row.series = row.case
    if ctx.machines:  # the knee is sought along the devices asked for
        row.level, row.unit = devices_n, "devices"
    else:  # the default levels vary tags and rates too: along the values offered
        row.level, row.unit = round(devices_n * per_message * rate), "values/s offered"
    row.rate, row.kind = "messages/s", "slow"
    ctx.say(f"  raw {row.load}: {row.figures['tag values/s']:,.0f} values/s, lost {row.lost}")
    return row


async def _until(
    proc: Proc, ready: Any, timeout_s: float = 30.0, idle_s: float = 5.0
) -> dict[str, float]:
    """The featurizer's metrics once ``ready``, or once its handled count stops moving."""
    deadline = time.monotonic() + timeout_s
    last, since = -1.0, time.monotonic()
    while True:
        samples = await asyncio.to_thread(proc.metrics)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        count = _processed(samples)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since > idle_s:
            return samples
        await asyncio.sleep(0.1)


class _Values:
    """Counts slow-tag values in raw data messages, and sequence gaps per node (loss).

    ``flowing`` is set once slow-tag values of ``devices`` distinct devices have arrived:
    the adapter is reading every machine, so a measurement may start (a birth, a death or
    an adapter still backing off after the simulator's server came up are not data).
    """

    def __init__(self, devices: int) -> None:
        self.values = 0
        self.messages = 0
        self.gaps = 0
        self.seq: dict[str, int] = {}
        self.counting = False
        self.devices = devices
        self.seen: set[str] = set()
        self.flowing = asyncio.Event()

    def __call__(self, message: Message, now: float) -> None:
        data: DeviceData = decode(message.payload, DeviceData)
        if not self.flowing.is_set() and any(
            not isinstance(m.value, Waveform) for m in data.metrics
        ):
            self.seen.add(message.topic)
            if len(self.seen) >= self.devices:
                self.flowing.set()
        last = self.seq.get(data.node)
        if last is not None and self.counting:
            self.gaps += (data.seq - last - 1) % SEQ_MODULUS
        self.seq[data.node] = data.seq
        if self.counting:
            self.messages += 1
            self.values += sum(1 for m in data.metrics if not isinstance(m.value, Waveform))


async def _adapter(ctx: Context, adapter: str) -> Row:
    from uns_simulator import adapter_config, scaled_plant

    seconds = 2.0 if ctx.quick else 10.0
    machines = 4 if ctx.quick else ADAPTER_MACHINES
    plant = [(p, "press") for p, _ in scaled_plant(machines, enterprise=ENTERPRISE)]
    opcua_port, modbus_port = _ports()
    sections = adapter_config(
        plant,
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=modbus_port,
        rate_hz=10_000.0,
        modbus_assets=("press",) if adapter == "modbus-adapter" else (),
    )
    services: dict[str, Any] = {
        "simulator": {
            "tick_s": ADAPTER_TICK_S,
            "opcua": {"port": opcua_port},
            "modbus": {"port": modbus_port},
        },
        **sections,
    }
    if adapter == "modbus-adapter":
        services["modbus-adapter"]["poll_groups"] = {"fast": ADAPTER_TICK_S, "slow": ADAPTER_TICK_S}
    procs = Procs(ctx.workdir)
    counter = _Values(machines)
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        cfg = str(config.write(ctx.workdir, adapter, [str(p) for p, _ in plant], services))
        common = ("--config", cfg, "--broker", url, "--log-level", "WARNING")
        running = {"broker": broker}
        running["simulator"] = procs.uns("simulator", "run", "simulator", *common, metrics=True)
        running["featurizer"] = procs.uns("featurizer", "run", "featurizer", *common, metrics=True)
        receiver = await Receiver(url, f"{ENTERPRISE}/+/+/+/+/+/raw/data", keep=counter).start()
        running[adapter] = procs.uns(adapter, "run", adapter, *common, metrics=True)
        started = time.monotonic()
        await _flowing(counter, running[adapter], adapter)
        ctx.say(
            f"  {adapter}: every machine's values flowing after {time.monotonic() - started:.1f} s"
        )
        runs = []
        for _ in range(ctx.repeats):
            pids = {name: p.pid for name, p in running.items()}
            counter.counting = True
            counter.values = counter.messages = counter.gaps = 0
            async with Sampler(pids) as sampler:
                t0 = time.monotonic()
                await asyncio.sleep(seconds)
                counter.counting = False
                t1 = time.monotonic()
            offered = machines * 10 / ADAPTER_TICK_S
            runs.append(
                {
                    "lost": counter.gaps,
                    "figures": {
                        "tag values/s": round(counter.values / (t1 - t0)),
                        "tag updates/s at the simulator": round(offered),
                        "messages/s": round(counter.messages / (t1 - t0)),
                    },
                    "cpu": sampler.cores(t0, t1),
                    "rss": sampler.peak_rss(),
                }
            )
        await receiver.stop()
    finally:
        procs.stop()
    row = summarise(
        "3 slow tags",
        f"simulator -> {adapter} -> featurizer",
        f"{machines} machines x 10 tags every {ADAPTER_TICK_S * 1000:g} ms"
        + (" + vibration" if adapter == "opcua-adapter" else ""),
        runs,
    )
    row.rate, row.kind = "messages/s", "slow"
    row.notes.append(
        "lost = sequence gaps seen downstream of the adapter; values that did not change"
        " between updates are not sent (report by exception)"
    )
    ctx.say(f"  {adapter}: {row.figures['tag values/s']:,.0f} values/s, gaps {row.lost}")
    return row


async def _modbus_ceiling(ctx: Context) -> Row:
    """The Modbus adapter against a server that answers faster than it polls: its reads/s,
    tag values/s and CPU per 1,000 values/s (the simulator's Modbus server, OPC UA off, its
    tags updated once a second: the adapter publishes every value it reads anyway)."""
    from uns_simulator import adapter_config, scaled_plant

    seconds = 2.0 if ctx.quick else 10.0
    units = 5 if ctx.quick else CEILING_UNITS
    plant = [(p, "press") for p, _ in scaled_plant(units, enterprise=ENTERPRISE)]
    opcua_port, modbus_port = _ports()
    sections = adapter_config(
        plant,
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=modbus_port,
        rate_hz=10_000.0,
        modbus_assets=("press",),
    )
    services: dict[str, Any] = {
        "simulator": {
            "tick_s": 1.0,
            "opcua": {"enabled": False, "port": opcua_port},
            "modbus": {"port": modbus_port},
        },
        "opcua-adapter": {"enabled": False},
        **sections,
    }
    services["modbus-adapter"] |= {
        "poll_groups": {"fast": CEILING_POLL_S, "slow": CEILING_POLL_S},
        "heartbeat_s": CEILING_POLL_S / 2,
    }
    procs = Procs(ctx.workdir)
    counter = _Values(units)
    adapter = "modbus-adapter"
    try:
        broker, url = procs.broker()
        await wait_broker(url)
        cfg = str(config.write(ctx.workdir, "modbus-ceiling", [str(p) for p, _ in plant], services))
        common = ("--config", cfg, "--broker", url, "--log-level", "WARNING")
        running = {"broker": broker}
        running["simulator"] = procs.uns("simulator", "run", "simulator", *common, metrics=True)
        receiver = await Receiver(url, f"{ENTERPRISE}/+/+/+/+/+/raw/data", keep=counter).start()
        running[adapter] = procs.uns(adapter, "run", adapter, *common, metrics=True)
        await _flowing(counter, running[adapter], adapter)
        runs = []
        for _ in range(ctx.repeats):
            pids = {name: p.pid for name, p in running.items()}
            before = await asyncio.to_thread(running[adapter].metrics)
            counter.counting = True
            counter.values = counter.messages = counter.gaps = 0
            async with Sampler(pids) as sampler:
                t0 = time.monotonic()
                await asyncio.sleep(seconds)
                counter.counting = False
                t1 = time.monotonic()
            after = await asyncio.to_thread(running[adapter].metrics)
            reads = metric_sum(after, "uns_modbus_reads_total", result="ok") - metric_sum(
                before, "uns_modbus_reads_total", result="ok"
            )
            values_s = counter.values / (t1 - t0)
            cpu = sampler.cores(t0, t1)
            runs.append(
                {
                    "lost": counter.gaps,
                    "figures": {
                        "tag values/s": round(values_s),
                        "reads/s": round(reads / (t1 - t0)),
                        "messages/s": round(counter.messages / (t1 - t0)),
                        "adapter cores per 1,000 values/s": round(
                            cpu.get(adapter, 0.0) / max(values_s / 1000, 1e-9), 3
                        ),
                    },
                    "cpu": cpu,
                    "rss": sampler.peak_rss(),
                }
            )
        await receiver.stop()
    finally:
        procs.stop()
    row = summarise(
        "3 slow tags",
        "Modbus adapter ceiling",
        f"{units} units x 11 tags behind one endpoint, polled every {CEILING_POLL_S * 1000:g} ms"
        " (as fast as it can), every value published",
        runs,
    )
    row.rate, row.kind = "messages/s", "slow"
    row.notes.append(
        "the adapter polls as fast as it can; the server (the simulator's pymodbus) shares"
        " the machine: whichever of them is at a core is the limit (see CPU)"
    )
    ctx.say(
        f"  modbus ceiling: {row.figures['reads/s']:,.0f} reads/s,"
        f" {row.figures['tag values/s']:,.0f} values/s, gaps {row.lost}"
    )
    return row


async def _flowing(counter: _Values, proc: Proc, adapter: str, timeout_s: float = 90.0) -> None:
    """Until every machine's slow-tag values arrive from ``adapter`` (it may be backing off
    while the simulator's servers start); a clear error if they never do."""
    waiter = asyncio.create_task(counter.flowing.wait())
    deadline = time.monotonic() + timeout_s
    while not waiter.done():
        if not proc.alive():
            waiter.cancel()
            raise RuntimeError(f"{adapter} exited; see {proc.log}")
        if time.monotonic() > deadline:
            waiter.cancel()
            raise RuntimeError(
                f"{adapter} sent values of {len(counter.seen)} of {counter.devices} machines"
                f" in {timeout_s:g} s; see {proc.log}"
            )
        await asyncio.wait({waiter}, timeout=0.2)


def _ports() -> tuple[int, int]:
    from uns_bench.procs import free_port

    return free_port(), free_port()
