"""``uns sim ...``: drive the simulated plant through the namespace, and write configs for it.

`fault`, `clear` and `status` are commands on the broker that the running simulator
answers; `plant` and `tagmap` write config sections from the simulator's catalog.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from uns import payloads as p
from uns.bus import Bus
from uns.commands import (
    BrokerOpt,
    ConfigOpt,
    Stop,
    broker_target,
    device_path,
    fail,
    load_config,
    on_broker,
    run_client,
)
from uns.config import BrokerSettings
from uns.errors import PayloadError
from uns.scope import reply_prefix
from uns.topics import DevicePath, node_topic
from uns_simulator.catalog import FAULT_EVENT, FAULT_KINDS, adapter_config, scaled_plant
from uns_simulator.settings import SimulatorSettings

app = typer.Typer(help="Drive the simulated plant: inject and clear faults.", no_args_is_help=True)


async def _command_and_wait(
    url: str,
    settings: BrokerSettings,
    stop: Stop,
    topic: str,
    command: p.Command,
    answer: str,
    match: Callable[[Any], bool],
    timeout: float,
) -> Any:
    """Publish ``command`` to ``topic`` and return the first payload on ``answer`` that matches
    within ``timeout`` of the connection (None if none); again after a reconnect."""

    async def work(bus: Bus) -> Any:
        await bus.subscribe(answer, qos=1)
        await bus.publish(topic, p.encode(command), qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for message in bus.messages():
                    if not message.payload:
                        continue
                    try:
                        payload: Any = p.decode(message.payload)
                    except PayloadError:
                        continue
                    if match(payload):
                        return payload
        except TimeoutError:
            return None
        return None

    return await on_broker(url, settings, stop, work)


@app.command("fault")
def sim_fault(
    device: Annotated[
        str,
        typer.Argument(
            metavar="DEVICE_PATH", help="e.g. acme/pune/stamping/line-3/cell-a/press-01"
        ),
    ],
    kind: Annotated[str, typer.Argument(help=", ".join(FAULT_KINDS))],
    severity: Annotated[float, typer.Option(min=0.0, max=1.0, help="Final severity")] = 1.0,
    ramp: Annotated[float, typer.Option(min=0.0, help="Seconds (simulated) to reach it")] = 0.0,
    tag: Annotated[str, typer.Option(help="Sensor of sensor_drift/stuck_sensor")] = "bearing_temp",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the simulator")] = 5.0,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Inject a fault into a simulated machine; waits until the simulator confirms it."""
    if kind not in FAULT_KINDS:
        raise fail(f"kind: {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    path = device_path(device)
    url, settings = broker_target(load_config(config), broker)
    command = p.Command(
        ts=p.now_ms(),
        name="fault",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"kind": kind, "severity": severity, "ramp_s": ramp, "tag": tag},
    )
    event = run_client(
        lambda stop: _command_and_wait(
            url,
            settings,
            stop,
            path.topic("cmd", "fault"),
            command,
            path.topic("events", FAULT_EVENT),
            lambda e: (
                isinstance(e, p.Event) and e.state == "raised" and e.details.get("fault") == kind
            ),
            timeout,
        )
    )
    if event is None:
        raise fail(f"no simulator confirmed the fault on {path} within {timeout:g} s", code=1)
    typer.echo(f"{kind} injected on {path}: severity {severity:g}, ramp {ramp:g} s")


@app.command("clear")
def sim_clear(
    device: Annotated[str, typer.Argument(metavar="DEVICE_PATH")],
    kind: Annotated[str | None, typer.Argument(help="Only this fault [default: all]")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the simulator")] = 5.0,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Clear a machine's faults; waits until the simulator confirms it."""
    path = device_path(device)
    url, settings = broker_target(load_config(config), broker)
    command = p.Command(
        ts=p.now_ms(),
        name="clear",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"kind": kind} if kind else {},
    )

    async def main(stop: Stop) -> Any:
        return await _command_and_wait(
            url,
            settings,
            stop,
            path.topic("cmd", "clear"),
            command,
            path.topic("events", FAULT_EVENT),
            lambda e: isinstance(e, p.Event) and e.state == "cleared",
            timeout,
        )

    if run_client(main) is None:
        raise fail(
            f"no fault cleared on {path} within {timeout:g} s (none active, or no simulator)",
            code=1,
        )
    typer.echo(f"faults cleared on {path}")


@app.command("status")
def sim_status(
    node: Annotated[str, typer.Option(help="The simulator's node id")] = "simulator",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="The raw answer as JSON")] = False,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Machines of the simulator and their active faults."""
    loaded = load_config(config)
    url, settings = broker_target(loaded, broker)
    ns = loaded.config.namespace
    reply_to = f"{reply_prefix(node)}{uuid.uuid4().hex}/reply"  # only that node may answer
    command = p.Command(
        ts=p.now_ms(),
        name="status",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"reply_to": reply_to},
    )
    reply = run_client(
        lambda stop: _command_and_wait(
            url,
            settings,
            stop,
            node_topic(ns.enterprise, ns.site, node, "cmd"),
            command,
            reply_to,
            lambda r: isinstance(r, p.Reply) and r.id == command.id,
            timeout,
        )
    )
    if reply is None:
        raise fail(f"no simulator node {node!r} answered within {timeout:g} s", code=1)
    if as_json:
        typer.echo(msgspec.json.encode(reply.result).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "asset", "unit", "faults (level/severity)")
    for path, d in sorted(reply.result.get("devices", {}).items()):
        faults = (
            ", ".join(f"{k} {f['level']:.2f}/{f['severity']:.2f}" for k, f in d["faults"].items())
            or "-"
        )
        table.add_row(path, d["asset"], str(d["unit_id"]), faults)
    Console().print(table)
    typer.echo(
        f"OPC UA {reply.result.get('opcua')}, Modbus {reply.result.get('modbus')}, "
        f"time x{reply.result.get('time_scale')}"
    )


@app.command("plant")
def sim_plant(
    machines: Annotated[int, typer.Option(min=1, max=247, help="How many machines")] = 40,
    out: Annotated[Path | None, typer.Option(help="Write it here [default: stdout]")] = None,
    config: ConfigOpt = None,
) -> None:
    """A whole config for a bigger simulated plant: N machines in the example's mix, the
    simulator and both adapters set up to read them (for demos and benchmarks)."""
    loaded = load_config(config)
    ns = loaded.config.namespace
    s = loaded.service("simulator", SimulatorSettings)
    devices = scaled_plant(machines, enterprise=ns.enterprise, site=ns.site)
    host = "127.0.0.1" if s.opcua.host in ("0.0.0.0", "::") else s.opcua.host
    document = {
        "namespace": {"enterprise": ns.enterprise, "site": ns.site},
        "broker": {"url": loaded.config.broker.url},
        "plant": {"devices": [{"path": str(p), "asset": a} for p, a in devices]},
        "services": {
            "demo": {"enabled": False},
            "simulator": {"opcua": {"port": s.opcua.port}, "modbus": {"port": s.modbus.port}},
            **adapter_config(
                devices,
                opcua_url=f"opc.tcp://{host}:{s.opcua.port}",
                modbus_host=host,
                modbus_port=s.modbus.port,
                rate_hz=s.rate_hz,
            ),
        },
    }
    text = f"# {machines} simulated machines: `uns sim plant --machines {machines}`\n"
    text += msgspec.yaml.encode(document).decode()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


@app.command("tagmap")
def sim_tagmap(
    config: ConfigOpt = None,
) -> None:
    """Print the opcua-adapter and modbus-adapter config sections that read the simulator."""
    loaded = load_config(config)
    s = loaded.service("simulator", SimulatorSettings)
    devices = [
        (DevicePath.parse(d.path), d.asset)
        for d in loaded.config.plant.devices
        if s.devices is None or d.path in s.devices
    ]
    host = "127.0.0.1" if s.opcua.host in ("0.0.0.0", "::") else s.opcua.host
    sections = adapter_config(
        devices,
        opcua_url=f"opc.tcp://{host}:{s.opcua.port}",
        modbus_host=host,
        modbus_port=s.modbus.port,
        rate_hz=s.rate_hz,
    )
    typer.echo(msgspec.yaml.encode({"services": sections}).decode())
