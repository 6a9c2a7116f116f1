"""``uns run plant``: each device's live state from the namespace, and the health of its
cell, line, area and site, retained at ``{group}/_health`` and republished on change."""

from __future__ import annotations

import asyncio

from uns import DeviceBirth, DeviceData, DeviceDeath, Event, Inbound, Node, Service, now_ms
from uns.payloads import Health, HealthLevel
from uns.topics import DevicePath, health_topic
from uns_plant.health import DeviceState, group_health
from uns_plant.settings import PlantSettings

LEVEL_OF: dict[int, HealthLevel] = {2: "site", 3: "area", 4: "line", 5: "cell"}


class PlantService(Service[PlantSettings]):
    name = "plant"
    Settings = PlantSettings

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
        devices = f"{node.enterprise}/{node.site}/+/+/+/+"
        node.subscribe(f"{devices}/raw/birth", DeviceBirth, self.on_birth)
        node.subscribe(f"{devices}/raw/death", DeviceDeath, self.on_death)
        node.subscribe(f"{devices}/scores/data", DeviceData, self.on_scores)
        node.subscribe(f"{devices}/events/+", Event, self.on_event)

    async def run(self) -> None:
        await self.publish_changes()
        await asyncio.Event().wait()  # the handlers do the work until stopped

    def _device(self, topic: str) -> DeviceState | None:
        """The plant device a topic is about (None: not in plant.yaml, so in no group)."""
        return self.states.get("/".join(topic.split("/")[:6]))

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        if (d := self._device(msg.topic)) is not None:
            d.online = True
            await self.publish_changes()

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        if (d := self._device(msg.topic)) is not None:
            d.online = False
            await self.publish_changes()

    async def on_scores(self, msg: Inbound[DeviceData]) -> None:
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
            return
        if event.state == "cleared":
            d.events.pop(event.id, None)
        else:
            d.events[event.id] = (event.kind, event.severity)
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
            )
            self.changes.labels(level).inc()
            await self.node.publish(health_topic(group), health, qos=1, retain=True)
