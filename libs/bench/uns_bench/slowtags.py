"""Scenario 3, slow tags: tag values/s into the featurizer, report by exception.

* raw namespace path: the load process publishes each device's changed values batched in
  one message (what an adapter publishes), the featurizer windows every value;
* through the adapters: the simulator's OPC UA and Modbus servers, read by the OPC UA
  adapter (subscriptions) or the Modbus adapter (polling), into the featurizer;
* each adapter's own ceiling: a server that changes (Modbus: answers) faster than the
  adapter can take, every value counted where it arrives on the broker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from uns import DeviceData, DevicePath, Message, Waveform, decode
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
CEILING_DEVICES = 50
CEILING_BLOCK = 1000
"""The OPC UA adapter's own ceiling: 50 presses (11 slow tags and a 1,000-sample vibration
array each) on an OPC UA server in its own process that rewrites every variable as fast as
it can; every tag sampled at 0 ms ("every change"), so the server's queue, not a sampling
timer, decides what a publishing cycle carries."""
CEILING_PUBLISH_MS = 100
"""The adapter's default publishing interval."""


async def run(ctx: Context) -> list[Row]:
    levels: tuple[tuple[int, int, float], ...] = QUICK_LEVELS if ctx.quick else LEVELS
    if ctx.machines:  # the devices asked for, each sending as many values as a default level
        per_message, rate = QUICK_PER_DEVICE if ctx.quick else PER_DEVICE
        levels = tuple((n, per_message, rate) for n in ctx.machines)
    rows = [await _raw(ctx, *level) for level in levels]
    for adapter in ("opcua-adapter", "modbus-adapter"):
        rows.append(await _adapter(ctx, adapter))
    rows.append(await _modbus_ceiling(ctx))
    for kind in ("both",) if ctx.quick else ("values", "blocks"):
        rows.append(await _opcua_ceiling(ctx, kind))
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
    """Counts slow-tag values and waveform blocks in raw data messages, and sequence gaps
    per node (loss).

    ``flowing`` is set once data of ``devices`` distinct devices has arrived (slow-tag
    values, or waveform blocks when ``blocks``): the adapter is reading every machine, so a
    measurement may start (a birth, a death or an adapter still backing off after the
    server came up are not data).
    """

    def __init__(self, devices: int, *, blocks: bool = False) -> None:
        self.values = 0
        self.blocks = 0
        self.messages = 0
        self.gaps = 0
        self.seq: dict[str, int] = {}
        self.counting = False
        self.devices = devices
        self.flow_on_blocks = blocks
        self.seen: set[str] = set()
        self.flowing = asyncio.Event()

    def __call__(self, message: Message, now: float) -> None:
        data: DeviceData = decode(message.payload, DeviceData)
        if not self.flowing.is_set() and any(
            isinstance(m.value, Waveform) == self.flow_on_blocks for m in data.metrics
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
            blocks = sum(1 for m in data.metrics if isinstance(m.value, Waveform))
            self.blocks += blocks
            self.values += len(data.metrics) - blocks


def _plant(machines: int) -> list[tuple[DevicePath, str]]:
    from uns_simulator import scaled_plant

    return [(p, "press") for p, _ in scaled_plant(machines, enterprise=ENTERPRISE)]


def _services(
    plant: list[tuple[DevicePath, str]], *, modbus: bool, simulator: dict[str, Any]
) -> dict[str, Any]:
    """The simulator's section (``simulator`` with its two servers on free ports) and both
    adapters' sections reading it: every machine over Modbus when ``modbus``, else over
    OPC UA (slow tags and vibration)."""
    from uns_simulator import adapter_config

    opcua_port, modbus_port = _ports()
    sections = adapter_config(
        plant,
        opcua_url=f"opc.tcp://127.0.0.1:{opcua_port}",
        modbus_host="127.0.0.1",
        modbus_port=modbus_port,
        rate_hz=10_000.0,
        modbus_assets=("press",) if modbus else (),
    )
    return {
        "simulator": {
            **simulator,
            "opcua": {**simulator.get("opcua", {}), "port": opcua_port},
            "modbus": {"port": modbus_port},
        },
        **sections,
    }


async def _start(
    ctx: Context,
    procs: Procs,
    name: str,
    plant: list[tuple[DevicePath, str]],
    services: dict[str, Any],
    adapter: str,
    counter: _Values,
    before: tuple[str, ...] = ("simulator",),
) -> tuple[dict[str, Proc], Receiver]:
    """The broker, the config file ``name``, the services ``before`` the adapter, the
    receiver counting raw data into ``counter``, then ``adapter`` (all in ``procs``)."""
    broker, url = procs.broker()
    await wait_broker(url)
    cfg = str(config.write(ctx.workdir, name, [str(p) for p, _ in plant], services))
    common = ("--config", cfg, "--broker", url, "--log-level", "WARNING")
    running = {"broker": broker}
    for service in before:
        running[service] = procs.uns(service, "run", service, *common, metrics=True)
    receiver = await Receiver(url, f"{ENTERPRISE}/+/+/+/+/+/raw/data", keep=counter).start()
    running[adapter] = procs.uns(adapter, "run", adapter, *common, metrics=True)
    return running, receiver


async def _window(
    counter: _Values, pids: dict[str, int], seconds: float
) -> tuple[Sampler, float, float]:
    """Count for ``seconds`` with the processes' CPU sampled: the sampler and the window."""
    counter.counting = True
    counter.values = counter.blocks = counter.messages = counter.gaps = 0
    async with Sampler(pids) as sampler:
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        counter.counting = False
        t1 = time.monotonic()
    return sampler, t0, t1


async def _adapter(ctx: Context, adapter: str) -> Row:
    seconds = 2.0 if ctx.quick else 10.0
    machines = 4 if ctx.quick else ADAPTER_MACHINES
    plant = _plant(machines)
    services = _services(
        plant, modbus=adapter == "modbus-adapter", simulator={"tick_s": ADAPTER_TICK_S}
    )
    if adapter == "modbus-adapter":
        services["modbus-adapter"]["poll_groups"] = {"fast": ADAPTER_TICK_S, "slow": ADAPTER_TICK_S}
    procs = Procs(ctx.workdir)
    counter = _Values(machines)
    receiver: Receiver | None = None
    try:
        running, receiver = await _start(
            ctx, procs, adapter, plant, services, adapter, counter, ("simulator", "featurizer")
        )
        started = time.monotonic()
        await _flowing(counter, running, adapter, receiver)
        ctx.say(
            f"  {adapter}: every machine's values flowing after {time.monotonic() - started:.1f} s"
        )
        runs = []
        for _ in range(ctx.repeats):
            pids = {name: p.pid for name, p in running.items()}
            sampler, t0, t1 = await _window(counter, pids, seconds)
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
    finally:
        if receiver is not None:
            await receiver.stop()  # before its broker goes
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
    seconds = 2.0 if ctx.quick else 10.0
    units = 5 if ctx.quick else CEILING_UNITS
    plant = _plant(units)
    services = _services(plant, modbus=True, simulator={"tick_s": 1.0, "opcua": {"enabled": False}})
    services["modbus-adapter"] |= {
        "poll_groups": {"fast": CEILING_POLL_S, "slow": CEILING_POLL_S},
        "heartbeat_s": CEILING_POLL_S / 2,
    }
    procs = Procs(ctx.workdir)
    counter = _Values(units)
    adapter = "modbus-adapter"
    receiver: Receiver | None = None
    try:
        running, receiver = await _start(
            ctx, procs, "modbus-ceiling", plant, services, adapter, counter
        )
        await _flowing(counter, running, adapter, receiver)
        runs = []
        for _ in range(ctx.repeats):
            pids = {name: p.pid for name, p in running.items()}
            before = await asyncio.to_thread(running[adapter].metrics)
            sampler, t0, t1 = await _window(counter, pids, seconds)
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
                        "adapter cores per 1,000 values/s": _per_1000(cpu[adapter], values_s),
                    },
                    "cpu": cpu,
                    "rss": sampler.peak_rss(),
                }
            )
    finally:
        if receiver is not None:
            await receiver.stop()  # before its broker goes
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


def _per_1000(cores: float, per_s: float) -> float:
    return round(cores / max(per_s / 1000, 1e-9), 3)


async def _opcua_ceiling(ctx: Context, kind: str) -> Row:
    """The OPC UA adapter against a server that changes faster than it can take: its slow-tag
    values/s (``kind`` "values"), waveform blocks/s ("blocks") or both at once ("both", the
    one row of ``--quick``: a server start costs seconds) and its CPU per 1,000.

    The server is the simulator's address space in its own process, without the simulator's
    physics: a loop rewriting every slow tag (or every vibration array) of every device with
    a new value, as fast as it can. It is node-opcua where it is installed (as ``.ci/run``
    does): asyncua's server spends about three times the adapter's CPU per value, so with
    it the server, not the adapter, is the limit; else the simulator's asyncua one.

    The adapter samples every tag at 0 ms, so each monitored item's queue holds two
    publishing cycles of changes; what the adapter does not take in time the server's queue
    drops (oldest first, as a PLC's does): no gap downstream, only fewer values than the
    server wrote (both are reported). The adapter's session has one Publish request in
    flight: it takes the next response once it has published the last one, so its own work
    per response sets the pace.
    """
    seconds = 1.0 if ctx.quick else 10.0
    devices = 4 if ctx.quick else CEILING_DEVICES
    units = {"values": "tag values/s", "blocks": "blocks/s"}
    kinds = ("values", "blocks") if kind == "both" else (kind,)
    plant = _plant(devices)
    services = _services(plant, modbus=False, simulator={"enabled": False})
    port = services["simulator"]["opcua"]["port"]
    services["opcua-adapter"]["publishing_interval_ms"] = CEILING_PUBLISH_MS
    for tags in services["opcua-adapter"]["templates"].values():
        for tag in tags:
            tag["sampling_ms"] = 0
    procs = Procs(ctx.workdir)
    counter = _Values(devices, blocks=kind == "blocks")
    adapter = "opcua-adapter"
    stats = ctx.workdir / f"opcua-ceiling-{kind}.json"
    stats.unlink(missing_ok=True)
    receiver: Receiver | None = None
    try:
        server, stack = _opcua_server(ctx.workdir, kind, port, plant, stats)
        procs.all.append(server)
        await _served(server, port)
        running, receiver = await _start(
            ctx, procs, f"opcua-ceiling-{kind}", plant, services, adapter, counter, ()
        )
        running["server"] = server
        await _flowing(counter, running, adapter, receiver)
        runs = []
        for _ in range(ctx.repeats):
            pids = {name: p.pid for name, p in running.items()} | {"receiver": os.getpid()}
            written = _written(stats)
            sampler, t0, t1 = await _window(counter, pids, seconds)
            wrote = _written(stats)
            cpu = sampler.cores(t0, t1)
            figures: dict[str, float] = {}
            for k in kinds:
                taken = (counter.blocks if k == "blocks" else counter.values) / (t1 - t0)
                offered = (wrote[k] - written[k]) / max(wrote["t"] - written["t"], 1e-9)
                figures[units[k]] = round(taken)
                figures[f"{units[k]} written by the server"] = round(offered)
                if kind != "both":  # the adapter's CPU is for one kind of change
                    figures[f"adapter cores per 1,000 {units[k]}"] = _per_1000(cpu[adapter], taken)
            figures["messages/s"] = round(counter.messages / (t1 - t0))
            runs.append(
                {"lost": counter.gaps, "figures": figures, "cpu": cpu, "rss": sampler.peak_rss()}
            )
    finally:
        if receiver is not None:
            await receiver.stop()  # before its broker goes
        procs.stop()
    what = {
        "values": "11 slow tags",
        "blocks": f"1 vibration array of {CEILING_BLOCK:,} floats",
        "both": f"11 slow tags and 1 vibration array of {CEILING_BLOCK:,} floats",
    }[kind]
    case = {"values": ", slow tags", "blocks": ", waveforms", "both": ""}[kind]
    row = summarise(
        "3 slow tags",
        f"OPC UA adapter ceiling{case}",
        f"{devices} devices x {what} rewritten by a {stack} server as fast as it can,"
        f" sampled at 0 ms, published every {CEILING_PUBLISH_MS} ms",
        runs,
    )
    row.rate, row.kind = "messages/s", "slow"
    said = []
    for k in kinds:
        unit = units[k]
        by_server = row.figures[f"{unit} written by the server"]
        said.append(f"{row.figures[unit]:,.0f} {unit} of {by_server:,.0f} written")
        ratio = by_server / max(row.figures[unit], 1e-9)
        row.notes.append(
            f"{unit}: the server wrote {ratio:.1f} x what the adapter took (the rest its"
            " queues dropped, oldest first): "
            + (
                "the adapter is the limit, its session one Publish request in flight, so its"
                " work per response sets the pace (its cores: its share of this machine)"
                if ratio > 1.2
                else "the server, not the adapter, is the limit here"
            )
        )
    ctx.say(f"  opcua ceiling, {kind}: {', '.join(said)}, gaps {row.lost}")
    return row


NODE_SERVER = r"""
"use strict";
// The OPC UA ceiling's server (uns_bench.slowtags): the simulator's address space, every
// variable rewritten as fast as the event loop allows; running totals in cfg.stats.
const fs = require("fs");
const { OPCUAServer, Variant, DataType, VariantArrayType, StatusCodes } = require("node-opcua");
const TYPES = { bool: DataType.Boolean, uint32: DataType.UInt32 };
async function main() {
  const cfg = JSON.parse(process.argv[process.argv.length - 1]);
  // MinSupportedSampleRate 0: an item sampled at 0 ms gets every change (node-opcua's default,
  // 50 ms, folds the changes of each 50 ms into one: the server's limit, not the adapter's)
  const server = new OPCUAServer({
    port: cfg.port, maxConnectionsPerEndpoint: 4,
    serverCapabilities: { minSupportedSampleRate: 0 },
  });
  await server.initialize();
  const space = server.engine.addressSpace;
  const ns = space.registerNamespace(cfg.namespace);  // index 2, as the simulator's
  const scalars = [], waves = [];
  for (const object of cfg.objects) {
    const parent = ns.addObject({
      organizedBy: space.rootFolder.objects, browseName: object, nodeId: `s=${object}`,
    });
    for (const tag of cfg.tags) {
      const dataType = TYPES[tag.datatype] || DataType.Double;
      const v = ns.addVariable({
        componentOf: parent, browseName: tag.name, nodeId: `s=${object}.${tag.name}`,
        dataType: DataType[dataType], minimumSamplingInterval: 0,
        value: new Variant({ dataType, value: dataType === DataType.Boolean ? false : 0 }),
      });
      scalars.push([v, dataType]);
    }
    waves.push(ns.addVariable({
      componentOf: parent, browseName: "vibration", nodeId: `s=${object}.vibration`,
      dataType: "Float", valueRank: 1, arrayDimensions: [cfg.block], minimumSamplingInterval: 0,
      value: new Variant({
        dataType: DataType.Float, arrayType: VariantArrayType.Array,
        value: new Float32Array(cfg.block),
      }),
    }));
  }
  await server.start();
  const written = { values: 0, blocks: 0 };
  const start = Date.now(), lengthMs = cfg.block * 1000 / cfg.rate_hz;
  let n = 0, reported = 0;
  const round = () => {
    n += 1;
    if (cfg.kind !== "values") {
      const t0 = new Date(start + n * lengthMs);  // back to back, as the contract has them
      for (const w of waves) {
        const samples = new Float32Array(cfg.block);
        samples[0] = n % 1000;  // a new value: the server reports changes only
        w.setValueFromSource(new Variant({
          dataType: DataType.Float, arrayType: VariantArrayType.Array, value: samples,
        }), StatusCodes.Good, t0);
      }
      written.blocks += waves.length;
    }
    if (cfg.kind !== "blocks") {
      const ts = new Date();
      for (const [v, dataType] of scalars) {
        const value = dataType === DataType.Boolean ? n % 2 === 1
          : dataType === DataType.UInt32 ? n : 1 + (n % 64) * 0.5;
        v.setValueFromSource(new Variant({ dataType, value }), StatusCodes.Good, ts);
      }
      written.values += scalars.length;
    }
    const now = Number(process.hrtime.bigint()) / 1e9;
    if (now - reported >= 0.1) {
      reported = now;
      fs.writeFileSync(cfg.stats + ".tmp", JSON.stringify({ t: now, ...written }));
      fs.renameSync(cfg.stats + ".tmp", cfg.stats);
    }
    setImmediate(round);  // the server's own work (Publish responses) in between
  };
  round();
}
main().catch((e) => { console.error(e); process.exit(1); });
"""
"""node-opcua's stand-in for `_serve_opcua` (the same address space, the same loop)."""


def _node_opcua() -> tuple[str, Path] | None:
    """``node`` and the node_modules holding node-opcua (``UNS_NODE_OPCUA_DIR``, else where
    ``.ci/run`` installs it), or None."""
    node = shutil.which("node")
    if node is None:
        return None
    found = [Path(d) for d in [os.environ.get("UNS_NODE_OPCUA_DIR", "")] if d]
    found += sorted(Path.home().glob(".cache/uns-node-opcua-*"), reverse=True)
    for base in found:
        if (base / "node_modules" / "node-opcua").is_dir():
            return node, base / "node_modules"
    return None


def _opcua_server(
    workdir: Path, kind: str, port: int, plant: list[tuple[DevicePath, str]], stats: Path
) -> tuple[Proc, str]:
    """The ceiling's server process (started) and the name of its OPC UA stack."""
    from uns_simulator import ASSETS, NAMESPACE_URI, opcua_object

    log = workdir / f"opcua-server-{kind}.log"
    if (node := _node_opcua()) is not None:
        binary, modules = node
        cfg = {
            "port": port,
            "kind": kind,
            "stats": str(stats),
            "namespace": NAMESPACE_URI,
            "objects": [opcua_object(p) for p, _ in plant],
            "tags": [{"name": t.name, "datatype": t.datatype} for t in ASSETS["press"]],
            "block": CEILING_BLOCK,
            "rate_hz": 10_000.0,
        }
        argv = [binary, "-e", NODE_SERVER, json.dumps(cfg)]
        env = {"NODE_PATH": str(modules)}
        return Proc(f"opcua-server-{kind}", argv, log, env).start(), "node-opcua"
    argv = [
        sys.executable,
        "-c",
        "import sys; from uns_bench.slowtags import serve_opcua; serve_opcua(sys.argv[1:])",
        *(str(port), str(stats), kind, *(str(p) for p, _ in plant)),
    ]
    return Proc(f"opcua-server-{kind}", argv, log).start(), "asyncua"


def _written(stats: Path) -> dict[str, float]:
    """The server's running totals: ``t`` (monotonic), ``values`` and ``blocks`` written."""
    out: dict[str, float] = json.loads(stats.read_text())
    return out


async def _served(server: Proc, port: int, timeout_s: float = 60.0) -> None:
    """Until the server accepts connections, so the adapter does not start by backing off."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if not server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OPC UA server did not start; see {server.log}") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


def serve_opcua(argv: list[str]) -> None:
    """The OPC UA ceiling's server process: ``port stats kind device...`` (see `_opcua_ceiling`)."""
    port, stats, kind, *devices = argv
    asyncio.run(_serve_opcua(int(port), Path(stats), kind, [DevicePath.parse(d) for d in devices]))


async def _serve_opcua(port: int, stats: Path, kind: str, paths: list[DevicePath]) -> None:
    import numpy as np

    from uns_simulator import ASSETS, OpcUaSim

    sim = OpcUaSim("127.0.0.1", port)
    tags = ASSETS["press"]
    await sim.build([(p, tags, CEILING_BLOCK) for p in paths])
    await sim.start()
    samples = np.zeros(CEILING_BLOCK, dtype=np.float32)
    length = dt.timedelta(seconds=CEILING_BLOCK / 10_000.0)
    start = dt.datetime.now(dt.UTC)
    written = {"values": 0, "blocks": 0}
    rounds, reported = 0, 0.0
    while True:
        rounds += 1
        if kind != "values":
            samples[0] = rounds % 1000  # a new value: the server reports changes only
            t0 = start + rounds * length  # back to back, as the contract has them
            for path in paths:
                await sim.write_block(path, samples, t0)
            written["blocks"] += len(paths)
        if kind != "blocks":
            ts = dt.datetime.now(dt.UTC)
            for path in paths:
                for tag in tags:
                    await sim.write(path, tag.name, _changed(tag.datatype, rounds), None, ts)
            written["values"] += len(paths) * len(tags)
        await asyncio.sleep(0)  # the server's own tasks: Publish requests and responses
        now = time.monotonic()
        if now - reported >= 0.1:
            reported = now
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(json.dumps({"t": now, **written}))
            os.replace(tmp, stats)


def _changed(datatype: str, n: int) -> float | int | bool:
    """The ``n``-th value of a tag: different from the one before, inside every tag's range."""
    if datatype == "bool":
        return n % 2 == 1
    if datatype == "uint32":
        return n
    return 1.0 + (n % 64) * 0.5


async def _flowing(
    counter: _Values,
    running: dict[str, Proc],
    adapter: str,
    receiver: Receiver,
    timeout_s: float = 90.0,
) -> None:
    """Until every machine's slow-tag values arrive from ``adapter`` (it may be backing off
    while the simulator's servers start); a clear error, with the log of the process to
    blame, if one of ``running`` exits (a server that could not listen), if the receiver
    lost its broker, or if they never arrive."""
    waiter = asyncio.create_task(counter.flowing.wait())
    deadline = time.monotonic() + timeout_s
    while not waiter.done():
        if receiver.task is not None and receiver.task.done():
            waiter.cancel()
            why = receiver.task.exception() if not receiver.task.cancelled() else "cancelled"
            raise RuntimeError(f"the receiver of {adapter}'s data ended: {why}")
        gone = [name for name, p in running.items() if not p.alive()]
        late = time.monotonic() > deadline
        if gone or late:
            waiter.cancel()
            blame = running[gone[0] if gone else adapter]
            what = (
                f"{gone[0]} exited"
                if gone
                else f"{adapter} sent values of {len(counter.seen)} of {counter.devices}"
                f" machines in {timeout_s:g} s"
            )
            raise RuntimeError(f"{what}; the end of {blame.log}:\n{blame.tail()}")
        await asyncio.wait({waiter}, timeout=0.2)


def _ports() -> tuple[int, int]:
    from uns_bench.procs import free_port

    return free_port(), free_port()
