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
from uns.payloads import Health, HealthLevel, Oee, OeeWindow
from uns.topics import DevicePath, health_topic, oee_topic
from uns_plant.health import RANK, DeviceState, group_health
from uns_plant.oee import MINUTE_MS, DeviceOee, Totals, plausible, totals
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
        calendar = self.settings.oee.calendar()
        self.calendar = calendar
        self.oee: dict[str, DeviceOee] = {}
        self.oee_groups: dict[tuple[str, ...], list[DeviceOee]] = {}
        for d in node.config.plant.devices:
            spec = self.settings.oee.spec(d.asset)
            if spec is None:
                continue
            tracker = self.oee[d.path] = DeviceOee(d.path, spec, calendar)
            levels = DevicePath.parse(d.path).levels
            for n in (4, 5):
                self.oee_groups.setdefault(levels[:n], []).append(tracker)
        self.shift: tuple[str, int, int] | None = None
        self.refused = node.metrics.counter(
            "uns_plant_oee_refused_total",
            "Raw samples OEE did not book, by reason (timestamp: too far from the box's clock)",
            ["reason"],
            zeros=("timestamp",),
        )
        self._refused_logged = -MINUTE_MS
        self.m_oee = node.metrics.gauge(
            "uns_plant_oee",
            "OEE and its factors per line and cell (uns-schema/README.md, OEE)",
            ["path", "window", "factor"],
        )
        self.state_path = Path(self.settings.state_file)
        self._state_lock = asyncio.Lock()
        self._restore_events()
        self.m_health = node.metrics.gauge(
            "uns_plant_health",
            "Each group's health: 0 ok, 1 warning, 2 critical (uns-schema/README.md, Health)",
            ["path", "level"],
        )
        devices = f"{node.enterprise}/{node.site}/+/+/+/+"
        node.subscribe(f"{devices}/raw/birth", DeviceBirth, self.on_birth)
        node.subscribe(f"{devices}/raw/death", DeviceDeath, self.on_death)
        node.subscribe(f"{devices}/raw/data", DeviceData, self.on_data)
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
        while True:  # the handlers do the rest until stopped
            await asyncio.sleep(self.settings.oee.publish_s)
            await self.publish_oee(now_ms())

    # ---- OEE ------------------------------------------------------------------------------

    async def on_data(self, msg: Inbound[DeviceData]) -> None:
        msg.ack()
        tracker = self.oee.get("/".join(msg.topic.split("/")[:6]))
        if tracker is None:
            return
        data = msg.payload
        now = now_ms()
        for m in data.metrics:
            if m.quality != "bad" and self._plausible(m.ts or data.ts, now, msg.topic):
                tracker.sample(m.ts or data.ts, m.name, m.value)

    def _plausible(self, ts: int, now: int, topic: str) -> bool:
        """A timestamp OEE may book (`uns_plant.oee.plausible`); else counted, and logged
        at most once a minute."""
        if plausible(ts, now):
            return True
        self.refused.labels("timestamp").inc()
        if now - self._refused_logged >= MINUTE_MS:
            self._refused_logged = now
            log.warning(
                "%s: a sample stamped %s ms from this box's clock is not booked in OEE"
                " (more are counted in uns_plant_oee_refused_total)",
                topic,
                f"{ts - now:+d}" if abs(ts - now) < 10**15 else "an absurd number of",
            )
        return False

    async def publish_oee(self, now: int) -> None:
        """The OEE of every line and cell over the current shift (and the final of the one
        that just ended) and the rolling hour."""
        for tracker in self.oee.values():
            tracker.advance(now)
        shift = self.calendar.shift(now)
        if self.shift is not None and shift != self.shift:
            name, start, end = self.shift
            await self._publish_window("shift", name, start, end - 1, final=True)
        self.shift = shift
        if shift is not None:
            await self._publish_window("shift", shift[0], shift[1], now)
        await self._publish_window("hour", "", now - 59 * MINUTE_MS, now)
        keep = min(now - 59 * MINUTE_MS, shift[1] if shift else now) // MINUTE_MS
        for tracker in self.oee.values():
            tracker.prune(keep)

    async def _publish_window(
        self, window: OeeWindow, name: str, start: int, end: int, *, final: bool = False
    ) -> None:
        for group, trackers in self.oee_groups.items():
            t = totals(trackers, start // MINUTE_MS, end // MINUTE_MS)
            if t.planned_s <= 0:
                continue  # nothing planned (yet): no OEE to tell
            await self.node.publish(
                oee_topic(group, window),
                self._oee(group, window, name, start, end, t, len(trackers), final),
                qos=1,
                retain=True,
            )
            path = "/".join(group)
            for factor in ("availability", "performance", "quality", "oee"):
                self.m_oee.labels(path, window, factor).set(getattr(t, factor))

    def _oee(
        self,
        group: tuple[str, ...],
        window: OeeWindow,
        name: str,
        start: int,
        end: int,
        t: Totals,
        devices: int,
        final: bool,
    ) -> Oee:
        return Oee(
            ts=now_ms(),
            level="line" if len(group) == 4 else "cell",
            path="/".join(group),
            window=window,
            shift=name,
            start=start,
            end=end,
            final=final,
            availability=round(t.availability, 6),
            performance=round(t.performance, 6),
            quality=round(t.quality, 6),
            oee=round(t.oee, 6),
            planned_s=round(t.planned_s, 3),
            run_s=round(t.run_s, 3),
            ideal_count=round(t.ideal_count, 3),
            count=t.count,
            good=t.good,
            scrap=t.scrap,
            devices=devices,
            flags=t.flags,
            node=self.node.id,
        )

    def _device(self, topic: str) -> DeviceState | None:
        """The plant device a topic is about (None: not in plant.yaml, so in no group)."""
        return self.states.get("/".join(topic.split("/")[:6]))

    async def on_birth(self, msg: Inbound[DeviceBirth]) -> None:
        msg.ack()
        if (tracker := self.oee.get("/".join(msg.topic.split("/")[:6]))) is not None:
            tracker.datatypes({m.name: m.datatype for m in msg.payload.metrics})
            if not msg.retained and self._plausible(msg.payload.ts, now_ms(), msg.topic):
                tracker.birth(msg.payload.ts)  # a retained one is old news: its ts is long past
            tracker.online = True
        if (d := self._device(msg.topic)) is not None:
            d.online = True
            await self.publish_changes()

    async def on_death(self, msg: Inbound[DeviceDeath]) -> None:
        msg.ack()
        if (tracker := self.oee.get("/".join(msg.topic.split("/")[:6]))) is not None:
            if not msg.retained and self._plausible(msg.payload.ts, now_ms(), msg.topic):
                tracker.death(msg.payload.ts)
            tracker.online = False
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
            self.m_health.labels(health.path, level).set(RANK[state])
            await self.node.publish(health_topic(group), health, qos=1, retain=True)
