from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from uns import Command, DevicePath, Event, Inbound, Node, Reject, Service, now_ms
from uns.topics import device_filter
from uns_simulator.catalog import ASSETS, FAULT_EVENT, FAULT_KINDS
from uns_simulator.modbus_server import ModbusSim
from uns_simulator.opcua_server import OpcUaSim
from uns_simulator.physics import MODELS, Machine, Production
from uns_simulator.settings import SimulatorSettings

log = logging.getLogger(__name__)


class Simulator(Service[SimulatorSettings]):
    """A stamping line on real OPC UA and Modbus TCP servers, with faults on command.

    Subscribes to ``+/+/+/+/+/+/cmd/fault`` and ``cmd/clear`` (its own devices only);
    publishes ``{device}/events/sim_fault`` (raised/cleared) as the ground truth of what
    was injected, and answers the node command ``status``.
    """

    name = "simulator"
    Settings = SimulatorSettings

    def __init__(self, node: Node[SimulatorSettings]) -> None:
        super().__init__(node)
        s = self.settings
        wanted = set(s.devices) if s.devices is not None else None
        self.machines: dict[DevicePath, Machine] = {}
        self.units: dict[DevicePath, int] = {}
        p = s.production
        production = Production(
            planned_stops=tuple((x.at_s, x.duration_s) for x in p.planned_stops),
            planned_every_s=p.planned_every_s,
            breakdowns_per_h=p.breakdowns_per_h,
            breakdown_s=p.breakdown_s,
            micro_stops_per_h=p.micro_stops_per_h,
            micro_stop_s=p.micro_stop_s,
            scrap_rate=p.scrap_rate,
        )
        self.assets: dict[DevicePath, str] = {}
        for i, device in enumerate(node.config.plant.devices):
            if wanted is not None and device.path not in wanted:
                continue
            if device.asset not in MODELS:
                log.warning(
                    "%s: asset type %r is not simulated (known: %s); skipped",
                    device.path,
                    device.asset,
                    ", ".join(MODELS),
                )
                continue
            path = DevicePath.parse(device.path)
            self.machines[path] = Machine(
                device.asset, s.seed * 1000 + i, rate_hz=s.rate_hz, production=production
            )
            self.assets[path] = device.asset
            self.units[path] = len(self.units) + 1
        self.fault_ids: dict[tuple[DevicePath, str], tuple[str, int]] = {}
        self.opcua: OpcUaSim | None = None
        self.modbus: ModbusSim | None = None
        self._silent: set[DevicePath] = set()
        self.serving = asyncio.Event()
        """Set once the OPC UA and Modbus servers accept connections."""
        node.subscribe(device_filter(stream="cmd", message="fault"), Command, self.on_command)
        node.subscribe(device_filter(stream="cmd", message="clear"), Command, self.on_command)

    # ---- commands ----------------------------------------------------------------------

    async def on_command(self, msg: Inbound[Command]) -> None:
        path = DevicePath.parse(msg.topic.rsplit("/", 2)[0])
        machine = self.machines.get(path)
        if machine is None:
            return  # another simulator's device, or none at all
        args = msg.payload.args
        if msg.payload.name == "fault":
            kind = args.get("kind")
            try:
                fault = machine.inject(
                    str(kind),
                    float(args.get("severity", 1.0)),
                    float(args.get("ramp_s", 0.0)),
                    str(args.get("tag", "bearing_temp")),
                )
            except (TypeError, ValueError) as exc:
                raise Reject("bad_command", str(exc)) from None
            started = now_ms()
            event_id = f"sim-{path.device}-{kind}-{started}"
            self.fault_ids[(path, fault.kind)] = (event_id, started)
            log.info(
                "%s: %s injected (severity %.2f, ramp %.0f s)",
                path,
                kind,
                fault.severity,
                fault.ramp_s,
            )
            await self._event(
                path,
                fault.kind,
                "raised",
                event_id,
                started,
                fault.severity,
                {"ramp_s": fault.ramp_s, "tag": fault.tag},
            )
        else:
            kind = args.get("kind")
            for cleared in machine.clear(str(kind) if kind else None):
                event_id, started = self.fault_ids.pop((path, cleared), ("", now_ms()))
                log.info("%s: %s cleared", path, cleared)
                await self._event(path, cleared, "cleared", event_id, started, 0.0, {})

    async def _event(
        self,
        path: DevicePath,
        kind: str,
        state: str,
        event_id: str,
        started: int,
        severity: float,
        details: dict[str, Any],
    ) -> None:
        await self.node.publish(
            path.topic("events", FAULT_EVENT),
            Event(
                ts=now_ms(),
                id=event_id,
                kind=FAULT_EVENT,
                state=state,  # type: ignore[arg-type]
                device=str(path),
                started=started,
                severity="info",
                summary=f"simulated {kind} {state}",
                score=severity,
                details={"fault": kind, **details},
            ),
            qos=1,
        )

    async def on_node_command(self, command: Command) -> dict[str, Any]:
        if command.name != "status":
            raise Reject(
                "unknown_command", f"simulator commands: rebirth, status (got {command.name!r})"
            )
        return {
            "time_scale": self.settings.time_scale,
            "opcua": self.opcua.endpoint if self.opcua else None,
            "modbus": f"{self.settings.modbus.host}:{self.settings.modbus.port}"
            if self.modbus
            else None,
            "devices": {
                str(path): {
                    "asset": self.assets[path],
                    "unit_id": self.units[path],
                    "running": m.running,
                    # the ground truth of OEE since the start (simulated seconds, strokes)
                    "truth": {**vars(m.truth), "ideal_cycle_s": m.ideal_cycle_s},
                    "faults": {
                        k: {
                            "severity": f.severity,
                            "level": round(f.level(m.now_s), 3),
                            "ramp_s": f.ramp_s,
                        }
                        for k, f in m.faults.items()
                    },
                }
                for path, m in self.machines.items()
            },
        }

    # ---- the plant -----------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        if s.opcua.enabled:
            self.opcua = OpcUaSim(s.opcua.host, s.opcua.port)
            await self.opcua.build([(p, ASSETS[self.assets[p]], s.block) for p in self.machines])
            await self.opcua.start()
        if s.modbus.enabled:
            self.modbus = ModbusSim(
                list(self.units.values()), s.modbus.host, s.modbus.port, self._dropped_out
            )
            await self.modbus.start()
        if not self.machines:
            log.warning(
                "no machine to simulate: plant.devices has none of the asset types %s",
                ", ".join(MODELS),
            )
        log.info(
            "simulating %d machines (%s), time x%g",
            len(self.machines),
            ", ".join(sorted(set(self.assets.values()))),
            s.time_scale,
        )
        self.serving.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._slow_tags())
                tg.create_task(self._vibration())
        finally:
            if self.opcua:
                await self.opcua.stop()
            if self.modbus:
                await self.modbus.stop()

    def _dropped_out(self, unit: int) -> bool:
        for path, u in self.units.items():
            if u == unit:
                return self.machines[path].dropped_out
        return False

    async def _slow_tags(self) -> None:
        s = self.settings
        last = time.monotonic()
        while True:
            now = time.monotonic()
            ts = datetime.now(UTC)
            for path, machine in self.machines.items():
                machine.step((now - last) * s.time_scale)
                tags = ASSETS[self.assets[path]]
                readings = machine.readings()
                if machine.dropped_out and path in self._silent:
                    continue  # no updates while dropped out, after saying so once
                self._silent.discard(path)
                for tag in tags:
                    value, status = readings[tag.state]
                    if self.opcua:
                        await self.opcua.write(path, tag.name, value, status, ts)
                    if self.modbus and status is None:
                        await self.modbus.write(self.units[path], tag.register, value)
                if machine.dropped_out:
                    self._silent.add(path)
            last = now
            await asyncio.sleep(s.tick_s)

    async def _vibration(self) -> None:
        """One block per machine per block period, paced by the wall clock (no drift)."""
        s = self.settings
        period = s.block / s.rate_hz
        start = time.monotonic()
        t0 = datetime.now(UTC)
        n = 0
        while True:
            block_t0 = t0 + timedelta(seconds=n * period)
            for path, machine in self.machines.items():
                samples = machine.vibration(s.block)  # generated even in dropout: time goes on
                if self.opcua and not machine.dropped_out:
                    await self.opcua.write_block(path, samples, block_t0)
            n += 1
            delay = start + n * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -10 * period:  # fell far behind (a slow box): skip ahead, say so
                skipped = int(-delay / period)
                log.warning("vibration generation %d blocks behind; skipping ahead", skipped)
                n += skipped


__all__ = ["FAULT_EVENT", "FAULT_KINDS", "Simulator"]
