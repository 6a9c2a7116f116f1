"""``uns run plant``: each device's live state from the namespace, and the health of its
cell, line, area and site, retained at ``{group}/_health`` and republished on change.

Open events outlive a restart: the service keeps the ones it has seen in its state file
(written before an event is acknowledged) and its broker session is persistent, so what
inference raised or cleared while it was away is delivered when it comes back (QoS 1).
Scores and births are not queued (QoS 0; births are retained)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import msgspec

from uns import DeviceBirth, DeviceData, DeviceDeath, Event, Inbound, Node, Service, now_ms
from uns.payloads import Health, HealthLevel
from uns.topics import DevicePath, health_topic
from uns_plant.health import DeviceState, group_health
from uns_plant.settings import PlantSettings

LEVEL_OF: dict[int, HealthLevel] = {2: "site", 3: "area", 4: "line", 5: "cell"}
log = logging.getLogger(__name__)


class SavedEvent(msgspec.Struct, frozen=True):
    """An open event as the state file keeps it."""

    id: str
    device: str
    kind: str
    severity: str


class PlantService(Service[PlantSettings]):
    name = "plant"
    Settings = PlantSettings
    persistent_session = True
    """Events raised or cleared while it restarts are queued for it by the broker."""

    def __init__(self, node: Node[PlantSettings]) -> None:
        super().__init__(node)
        self.states = {
            d.path: DeviceState(d.path, d.criticality) for d in node.config.plant.devices
        }
        self.groups: dict[tuple[str, ...], list[DeviceState]] = {}
        for path, state in self.states.items():
            levels = DevicePath.parse(path).levels
            for n in LEVEL_OF:
                self.groups.setdefault(levels[:n], []).append(state)
        self.published: dict[tuple[str, ...], tuple[object, ...]] = {}
        self.changes = node.metrics.counter(
            "uns_plant_health_changes_total",
            "Health messages published (each a change of a group's health)",
            ["level"],
            zeros=tuple(LEVEL_OF.values()),
        )
        self.state_path = Path(self.settings.state_file)
        self._state_lock = asyncio.Lock()
        self._restore_events()
        devices = f"{node.enterprise}/{node.site}/+/+/+/+"
        node.subscribe(f"{devices}/raw/birth", DeviceBirth, self.on_birth)
        node.subscribe(f"{devices}/raw/death", DeviceDeath, self.on_death)
        node.subscribe(f"{devices}/scores/data", DeviceData, self.on_scores)
        node.subscribe(f"{devices}/events/+", Event, self.on_event, qos=1)

    # ---- open events across restarts ----------------------------------------------------

    def _restore_events(self) -> None:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot read open events (%s): starting without", self.state_path, exc)
            return
        try:
            saved = msgspec.json.decode(data, type=list[SavedEvent])
        except msgspec.DecodeError as exc:
            log.error("%s: not a state file (%s): starting without", self.state_path, exc)
            return
        for e in saved:
            if (d := self.states.get(e.device)) is not None:
                d.events[e.id] = (e.kind, e.severity)
        log.info("%s: %d open events from before the restart", self.state_path, len(saved))

    def _saved(self) -> list[SavedEvent]:
        return [
            SavedEvent(id=i, device=d.path, kind=kind, severity=severity)
            for d in self.states.values()
            for i, (kind, severity) in d.events.items()
        ]

    def _write(self, events: list[SavedEvent]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(events))
        os.replace(tmp, self.state_path)

    async def _save_events(self) -> None:
        events = self._saved()  # taken now, on the loop; written in a thread, in order
        async with self._state_lock:
            try:
                await asyncio.to_thread(self._write, events)
            except OSError as exc:
                log.error(
                    "%s: cannot save the open events (%s): a restart would forget them",
                    self.state_path,
                    exc,
                )

    async def run(self) -> None:
        await self.publish_changes()
        await asyncio.Event().wait()  # the handlers do the work until stopped

    def _device(self, topic: str) -> DeviceState | None:
        """The plant device a topic is about (None: not in plant.yaml, so in no group)."""
        return self.states.get("/".join(topic.split("/")[:6]))

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        msg.ack()
        if (d := self._device(msg.topic)) is not None:
            d.online = True
            await self.publish_changes()

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        msg.ack()
        if (d := self._device(msg.topic)) is not None:
            d.online = False
            await self.publish_changes()

    async def on_scores(self, msg: Inbound[DeviceData]) -> None:
        msg.ack()
        if (d := self._device(msg.topic)) is None:
            return
        for m in msg.payload.metrics:
            if not isinstance(m.value, (int, float)) or isinstance(m.value, bool):
                continue
            if m.name == "anomaly_score":
                d.score = float(m.value)
            elif m.name == "anomaly_threshold":
                d.threshold = float(m.value)
            elif m.name == "rul":
                d.rul = float(m.value)
        await self.publish_changes()

    async def on_event(self, msg: Inbound[Event]) -> None:
        event = msg.payload
        if (d := self.states.get(event.device)) is None:
            msg.ack()
            return
        before = dict(d.events)
        if event.state == "cleared" or event.severity == "info":
            # info is no fault (e.g. the simulator's ground truth, events/sim_fault)
            d.events.pop(event.id, None)
        else:
            d.events[event.id] = (event.kind, event.severity)
        if d.events != before:
            await self._save_events()  # kept before the broker may forget it
        msg.ack()
        await self.publish_changes()

    async def publish_changes(self) -> None:
        """Publish every group whose health differs from what it last published."""
        rul = self.settings.rul_warning
        for group, devices in self.groups.items():
            state, causes = group_health(devices, rul)
            offline = sum(d.online is False for d in devices)
            events = sum(len(d.events) for d in devices)
            key = (state, tuple(causes), offline, events)
            if self.published.get(group) == key:
                continue
            self.published[group] = key
            level = LEVEL_OF[len(group)]
            health = Health(
                ts=now_ms(),
                level=level,
                path="/".join(group),
                state=state,
                devices=len(devices),
                offline=offline,
                open_events=events,
                causes=causes,
                node=self.node.id,
            )
            self.changes.labels(level).inc()
            await self.node.publish(health_topic(group), health, qos=1, retain=True)
