"""Publishing a recording as an edge node, paced by the file's timestamps.

A replay knows the broker took every row: it subscribes to its own device's data and
counts each row it sees come back. A PUBACK alone does not say it (an MQTT 3.1.1 broker
acknowledges, then silently drops, what an ACL refuses; amqtt 0.12 dropped what a client
sent just before disconnecting; a broker that restarts loses what it acknowledged and
had not routed). A row not seen back within ``confirm_timeout_s`` of the end makes the
replay exit non-zero (`IncompleteReplay`) with a line saying how many.

Its end is a message: the device's raw death (retained), reason `END_OF_REPLAY`, sent
once every row is seen back (or the wait for them is over), so a recorder stops on it
instead of counting rows or guessing from silence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec

from uns import DeviceData, DevicePath, Inbound, Metric, Node, Service, ServiceSettings
from uns.payloads import END_OF_REPLAY as END_OF_REPLAY  # the contract's; exported here too
from uns_replay.frames import Recording

log = logging.getLogger(__name__)


class ReplaySettings(ServiceSettings, frozen=True):
    speed: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """1 = as recorded, 60 = an hour a minute, 0 = as fast as the broker acknowledges."""
    confirm_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """After the last row: how long to wait for every row to come back from the broker."""


class IncompleteReplay(SystemExit):
    """Rows the broker did not take: the replay's exit code is 1 and its message says why."""

    def __init__(self, message: str, *, sent: int, missing: int) -> None:
        super().__init__(f"error: {message}")
        self.sent, self.missing = sent, missing


def _row_key(ts: int, metrics: list[Metric]) -> tuple[int, int]:
    """A row's identity, the same for what was sent and what comes back: metrics are
    frozen structs, hashed by value (and 12000 hashes as 12000.0 does, which is what a
    number sent as an int comes back as when the field is a float)."""
    return ts, hash(tuple(metrics))


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
        self.finished = False
        """Every row was queued (not stopped early)."""
        self.unconfirmed: collections.Counter[tuple[int, int]] = collections.Counter()
        """Rows sent and not yet seen back from the broker."""
        self.confirmed = asyncio.Event()
        node.subscribe(path.topic("raw", "data"), DeviceData, self.on_echo, qos=1)

    async def on_echo(self, msg: Inbound[DeviceData]) -> None:
        if msg.payload.node != self.node.id:
            return  # another publisher of the same device: not one of our rows
        key = _row_key(msg.payload.ts, msg.payload.metrics)
        if self.unconfirmed[key] > 1:
            self.unconfirmed[key] -= 1
        else:  # (a row seen twice, re-sent after a reconnect, finds nothing more to confirm)
            self.unconfirmed.pop(key, None)
        if self.finished and not self.unconfirmed:
            self.confirmed.set()

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
            # while the broker is away the rows wait here, not in the node's bounded queue
            # (which would drop the oldest when full)
            await node.connected.wait()
            self.unconfirmed[_row_key(ts, metrics)] += 1
            await node.device_data(self.path, "raw", metrics, ts=ts, qos=1)
            self.sent += 1
        self.finished = True
        await node.drained()
        if not self.unconfirmed:
            self.confirmed.set()
        try:
            await asyncio.wait_for(self.confirmed.wait(), self.settings.confirm_timeout_s)
        except TimeoutError:
            pass
        missing = sum(self.unconfirmed.values())
        # the end, for whoever waits for it (a recorder): after every row came back, so a
        # subscriber to the device's data has been sent each row before this death
        await node.device_death(
            self.path, "raw", f"{END_OF_REPLAY}: {self.sent} rows, {self.sent - missing} seen back"
        )
        await node.drained()
        if missing:
            log.error(
                "%s: %d of %d rows not seen back from the broker within %g s: it did not"
                " take them (a refusing ACL, a broker restart, or a loss on the way)",
                self.path,
                missing,
                self.sent,
                self.settings.confirm_timeout_s,
            )
        else:
            log.info(
                "replayed %d messages to %s, every one seen back from the broker%s",
                self.sent,
                self.path,
                f"; unreadable values skipped: {self.recording.skipped}"
                if self.recording.skipped
                else "",
            )
        self.done.set()


@dataclass(frozen=True)
class Replayed:
    """What a replay did: rows published, rows seen back from the broker, and whether it
    got to the end of the file (not stopped by a signal)."""

    sent: int
    seen_back: int
    finished: bool


async def replay(
    node: Node[ReplaySettings], path: DevicePath, recording: Recording, stop: asyncio.Event
) -> Replayed:
    """Publish ``recording`` as ``path``'s raw metrics; say how many rows the broker took.

    Raises `IncompleteReplay` (a `SystemExit`: the command exits 1 with its message) when
    rows were not seen back from the broker. Stopped early (``stop`` set by a signal), it
    returns what it sent, ``finished`` false.
    """
    service = Replay(node, path, recording, stop)
    await node.serve(service, stop)
    missing = sum(service.unconfirmed.values())
    if service.finished and missing:
        raise IncompleteReplay(
            f"{missing} of {service.sent} rows published to {path}/raw/data were not seen"
            f" back from the broker within {node.settings.confirm_timeout_s:g} s: the"
            " broker did not take them (a refusing ACL, a broker restart, or a loss on"
            " the way); replay the file again",
            sent=service.sent,
            missing=missing,
        )
    return Replayed(service.sent, service.sent - missing, service.finished)
