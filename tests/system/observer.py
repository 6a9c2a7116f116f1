"""What the plant's consumers see: a watcher on the local broker and one on the cloud.

Each watcher is a real MQTT client (`uns.bus.connect`, QoS 1) on its own event loop in its
own thread, so a test blocked in a subprocess or in hypothesis still receives. It keeps a
compact record of every message (receive time, topic, size, a digest of the payload and
the envelope's header fields) and the state a consumer derives from it: the last birth
and death of every node and device, sequence gaps, events. A test waits on that state
(`Watcher.until`), never on a fixed sleep.

A message is identified across the bridge by (topic, blake2b of the payload): the bridge
forwards payloads byte for byte, and every envelope carries its ``ts`` and ``seq``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from uns.bus import Bus, connect
from uns.errors import BusError

T = TypeVar("T")


class _Quality(msgspec.Struct):
    quality: str = "good"


class _Head(msgspec.Struct):
    """The envelope fields a consumer looks at; everything else is skipped."""

    type: str = ""
    ts: int | float | None = None
    node: str = ""
    seq: int | None = None
    bdseq: int | None = None
    device: str = ""
    id: str = ""
    state: str = ""
    kind: str = ""
    reason: str = ""
    metrics_url: str = ""
    metrics: list[_Quality] | None = None


MAX_BRACKETS = 5000
"""A payload with more brackets than this is not decoded here (hostile nesting): the
watcher is a consumer too, and must not fall over what the services are tested with."""
_decode_head = msgspec.json.Decoder(_Head).decode


@dataclass(slots=True)
class Seen:
    """One received message, as a consumer saw it."""

    t: float
    """Wall-clock receive time (time.time())."""
    topic: str
    retain: bool
    size: int
    digest: bytes
    type: str = ""
    ts: int | None = None
    node: str = ""
    seq: int | None = None
    bdseq: int | None = None
    id: str = ""
    state: str = ""
    reason: str = ""
    metrics_url: str = ""
    bad: bool = False
    """A data message with a metric of bad quality."""

    @property
    def key(self) -> tuple[str, bytes]:
        return (self.topic, self.digest)


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=12).digest()


def record(topic: str, payload: bytes, retain: bool, t: float) -> Seen:
    seen = Seen(t, topic, retain, len(payload), digest(payload))
    if not payload or payload[:1] != b"{":
        return seen
    if payload.count(b"[") + payload.count(b"{") > MAX_BRACKETS:
        return seen
    try:
        head = _decode_head(payload)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return seen
    seen.type = head.type
    seen.ts = head.ts if isinstance(head.ts, int) else None
    seen.node = head.node
    seen.seq = head.seq
    seen.bdseq = head.bdseq
    seen.id = head.id
    seen.state = head.state
    seen.reason = head.reason
    seen.metrics_url = head.metrics_url
    if seen.type == "ddata" and head.metrics:
        seen.bad = any(m.quality == "bad" for m in head.metrics)
    return seen


class Loop:
    """An asyncio loop in a daemon thread; `call` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class State:
    """What a consumer of the namespace knows, updated with every message."""

    seen: list[Seen] = field(default_factory=list)
    last: dict[str, Seen] = field(default_factory=dict)
    """The last non-empty message per topic."""
    cleared: dict[str, float] = field(default_factory=dict)
    """Topic -> time of the last zero-length (retained clear) message."""
    gaps: list[tuple[str, int, int, float]] = field(default_factory=list)
    """(topic, previous seq, seq, time) of every sequence jump inside one birth."""
    node_seq: dict[str, int] = field(default_factory=dict)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    sys: dict[str, str] = field(default_factory=dict)
    """$SYS values of the broker (Mosquitto), by topic."""


class Watcher:
    """A consumer of one broker: subscribes, records, reconnects when the broker goes."""

    def __init__(
        self,
        name: str,
        url: str,
        filters: Iterable[str],
        *,
        client_id: str,
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.filters = list(filters)
        self.client_id = client_id
        self.keep = keep or (lambda topic: True)
        self.state = State()
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.offline: list[tuple[float, float]] = []
        """(from, to) of every interval this watcher itself was disconnected."""
        self._loop = Loop(f"watch-{name}")
        self._task = self._loop.spawn(self._run())

    async def _run(self) -> None:
        lost_at: float | None = None
        while True:
            try:
                async with connect(self.url, client_id=self.client_id, timeout_s=5) as bus:
                    for f in self.filters:
                        await bus.subscribe(f, qos=1 if not f.startswith("$SYS") else 0)
                    if lost_at is not None:
                        self.offline.append((lost_at, time.time()))
                        lost_at = None
                    self.connected.set()
                    await self._receive(bus)
            except BusError:
                pass
            if self.connected.is_set() or lost_at is None:
                lost_at = lost_at or time.time()
            self.connected.clear()
            await asyncio.sleep(0.2)

    async def _receive(self, bus: Bus) -> None:
        state = self.state
        async for m in bus.messages():
            now = time.time()
            if m.topic.startswith("$SYS/"):
                state.sys[m.topic] = m.payload.decode(errors="replace")
                continue
            if not self.keep(m.topic):
                state.counts["ignored"] += 1
                continue
            seen = record(m.topic, m.payload, m.retain, now)
            with self.cond:
                state.seen.append(seen)
                if m.payload:
                    state.last[m.topic] = seen
                else:
                    state.cleared[m.topic] = now
                self._sequence(seen)
                self.cond.notify_all()

    def _sequence(self, seen: Seen) -> None:
        """Sparkplug: per node, seq counts 0..255 across its device messages; a birth
        resets it. A jump is a gap a consumer can see."""
        if seen.retain or not seen.node or seen.seq is None:
            return
        if seen.type == "nbirth":
            self.state.node_seq[seen.node] = 0
            return
        if seen.type not in ("ddata", "dbirth", "ddeath"):
            return
        last = self.state.node_seq.get(seen.node)
        if last is not None and seen.seq != (last + 1) % 256:
            self.state.gaps.append((seen.topic, last, seen.seq, seen.t))
        self.state.node_seq[seen.node] = seen.seq

    # ---- what tests ask ------------------------------------------------------------------

    def until(self, predicate: Callable[[State], T], timeout: float, what: str = "") -> T:
        """Wait until ``predicate(state)`` is truthy (checked on every message and every
        0.5 s); return its value, or fail saying ``what`` did not happen."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(self.state)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {what or predicate} within {timeout} s")
                self.cond.wait(min(left, 0.5))

    def snapshot(self, since: float = 0.0, until: float | None = None) -> list[Seen]:
        with self.cond:
            items = list(self.state.seen)
        return [s for s in items if s.t >= since and (until is None or s.t <= until)]

    def close(self) -> None:
        self._task.cancel()
        self._loop.close()


class Publisher:
    """A client that publishes (commands, fuzz, retained clears) from its own loop."""

    def __init__(self, url: str, client_id: str) -> None:
        self.url = url
        self.client_id = client_id
        self._loop = Loop(f"pub-{client_id}")
        self.sent = 0
        self.failed = 0

    def publish_many(
        self,
        messages: Iterable[tuple[str, bytes, int, bool]],
        *,
        rate: float = 0.0,
        timeout: float = 600,
    ) -> int:
        """Publish (topic, payload, qos, retain) at most ``rate`` per second (0: no limit);
        reconnect on loss; return how many the broker took (QoS 1: acknowledged)."""
        return self._loop.call(self._many(list(messages), rate), timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.publish_many([(topic, payload, qos, retain)], timeout=60)

    async def _many(self, messages: list[tuple[str, bytes, int, bool]], rate: float) -> int:
        done = 0
        started = time.monotonic()
        while done < len(messages):
            try:
                async with connect(self.url, client_id=self.client_id, timeout_s=10) as bus:
                    while done < len(messages):
                        topic, payload, qos, retain = messages[done]
                        try:
                            await bus.publish(topic, payload, qos=qos, retain=retain)
                        except ValueError:  # paho refuses it before it leaves (e.g. '#')
                            self.failed += 1
                        done += 1
                        self.sent += 1
                        if rate and done % 20 == 0:
                            ahead = started + done / rate - time.monotonic()
                            if ahead > 0:
                                await asyncio.sleep(ahead)
            except BusError:
                await asyncio.sleep(0.5)
        return done

    def close(self) -> None:
        self._loop.close()
