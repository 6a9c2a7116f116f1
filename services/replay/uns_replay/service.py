"""Publishing a recording as an edge node, paced by the file's timestamps."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import msgspec

from uns import DevicePath, Node, Service, ServiceSettings
from uns_replay.frames import Recording

log = logging.getLogger(__name__)


class ReplaySettings(ServiceSettings, frozen=True):
    speed: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """1 = as recorded, 60 = an hour a minute, 0 = as fast as the broker acknowledges."""


class Replay(Service[ReplaySettings]):
    name = "replay"
    Settings = ReplaySettings

    def __init__(
        self,
        node: Node[ReplaySettings],
        path: DevicePath,
        recording: Recording,
        done: asyncio.Event,
    ) -> None:
        super().__init__(node)
        self.path, self.recording, self.done = path, recording, done
        self.sent = 0

    async def run(self) -> None:
        node, speed = self.node, self.settings.speed
        await node.connected.wait()
        await node.device_birth(self.path, "raw", self.recording.metrics)
        first_ts: int | None = None
        started = time.monotonic()
        for ts, metrics in self.recording.frames:
            if speed > 0:
                first_ts = ts if first_ts is None else first_ts
                delay = started + (ts - first_ts) / 1000 / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            # QoS 1 and the node's bounded queue: the broker acknowledges every frame
            await node.device_data(self.path, "raw", metrics, ts=ts, qos=1)
            self.sent += 1
        await node.drained()
        log.info(
            "replayed %d messages to %s%s",
            self.sent,
            self.path,
            f"; unreadable values skipped: {self.recording.skipped}"
            if self.recording.skipped
            else "",
        )
        self.done.set()


async def replay(
    node: Node[ReplaySettings], path: DevicePath, recording: Recording, stop: asyncio.Event
) -> int:
    """Publish ``recording`` as ``path``'s raw metrics; return the number of messages sent."""
    service = Replay(node, path, recording, stop)
    await node.serve(service, stop)
    return service.sent
