"""Run a service on the runtime in-process, and watch what it publishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import msgspec

from uns import Message, Node, connect, decode
from uns.bus import Bus
from uns.config import Device, Namespace, Plant, UnsConfig


@asynccontextmanager
async def running(
    service_cls: Any,
    url: str,
    enterprise: str,
    /,
    *,
    plant: list[tuple[str, str]] | None = None,
    **settings: Any,
) -> AsyncIterator[Node[Any]]:
    """Start ``service_cls`` against ``url`` under ``enterprise``; stop it cleanly after.

    ``settings`` are decoded like a config section (nested dicts allowed); ``plant`` gives
    the config's ``plant.devices`` as (path, asset type) pairs.
    """
    config = UnsConfig(
        namespace=Namespace(enterprise=enterprise, site="pune"),
        plant=Plant(devices=[Device(path=p, asset=a) for p, a in plant or []]),
    )
    s = msgspec.convert({"metrics_port": 0, **settings}, service_cls.Settings, from_attributes=True)
    node = Node(service_cls.name, s, config, broker_url=url, version="test")
    stop = asyncio.Event()
    task = asyncio.create_task(node.serve(service_cls(node), stop))
    connected = asyncio.create_task(node.connected.wait())
    await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        connected.cancel()
        task.result()
    try:
        yield node
    finally:
        stop.set()
        await task


class Watcher:
    """A subscriber that waits for specific messages (events, not sleeps)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.seen: list[Message] = []

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> Message:
        async with asyncio.timeout(timeout):
            async for message in self.bus.messages():
                self.seen.append(message)
                if predicate(message):
                    return message
        raise AssertionError("unreachable")

    async def wait_topic(self, suffix: str, timeout: float = 10.0, *, nonempty: bool = True) -> Any:
        m = await self.wait_for(
            lambda m: m.topic.endswith(suffix) and (bool(m.payload) or not nonempty), timeout
        )
        return decode(m.payload) if m.payload else None


@asynccontextmanager
async def watching(url: str, topic_filter: str) -> AsyncIterator[Watcher]:
    async with connect(url) as bus:
        await bus.subscribe(topic_filter, qos=1)
        yield Watcher(bus)


class Records(logging.Handler):
    """Log records of a test, with an awaitable 'something was logged'."""

    def __init__(self, timeout: float = 10.0) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()
        self.timeout = timeout

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def wait(self, predicate: Any, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout or self.timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def of(self, prefix: str, level: int = logging.WARNING) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name.startswith(prefix) and r.levelno >= level]


@contextmanager
def capturing_logs(logger: str, timeout: float = 10.0) -> Iterator[Records]:
    """Capture every log record while ``logger`` logs at INFO and above."""
    handler = Records(timeout)
    root = logging.getLogger()
    watched = logging.getLogger(logger)
    level = watched.level
    watched.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        watched.setLevel(level)
