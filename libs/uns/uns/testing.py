"""Testing a service in-process: what a service author needs, and what our own tests use.

Run the `Service` on the runtime against the in-memory broker (``memory://``, no network,
no broker to install) or a real broker URL, watch a topic filter for what it publishes,
publish to it, and stop it cleanly; every wait is for an event, never a sleep::

    from uns import DeviceBirth, DeviceData
    from uns.testing import memory_broker, running, watching

    async def test_the_demo_is_born_then_sends_data():
        async with (
            memory_broker() as url,
            watching(url, "acme/#") as w,
            running(DemoService, url, "acme", interval_s=0.01),
        ):
            birth = await w.next("acme/+/+/+/+/+/raw/birth", DeviceBirth)
            data = await w.next("acme/+/+/+/+/+/raw/data", DeviceData)

A `Watcher` collects every message of its subscription as it arrives (`Watcher.messages`);
``wait_for``/``next`` go through them in order, each from where the previous wait stopped
(`Watcher.seen` is what they went through), and ``wait`` holds until a condition over
everything collected is true. A wait that times out raises `TimeoutError` saying what it
waited for and what it saw. This module imports only ``uns`` (and what ``uns`` imports):
a test of a light service stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, overload

import msgspec

from uns.bus import Bus, Message, connect
from uns.config import Device, Namespace, Plant, UnsConfig
from uns.membus import MemoryBroker
from uns.payloads import Payload, decode, encode
from uns.runtime import Node, Service
from uns.topics import matches

__all__ = ["Watcher", "free_port", "memory_broker", "memory_url", "running", "watching"]

T = TypeVar("T")
W = TypeVar("W", bound="Watcher")


_HANDED_OUT: set[int] = set()
_CLAIMS = Path(tempfile.gettempdir()) / "uns-free-ports"
_CLAIM_S = 300.0  # a claim older than this is stale: its server has long bound it (or never will)


def _ephemeral_low() -> int:
    """The lowest port the kernel gives an outgoing connection (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # IANA's dynamic range, as macOS and Windows use it


def _claim(port: int) -> bool:
    """Whether this process may hand out ``port``: no other process on the machine claimed
    it in the last `_CLAIM_S` (a file per port, created exclusively)."""
    path = _CLAIMS / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime < _CLAIM_S:
                return False
            os.utime(path)  # stale: take it over
            return True
        except OSError:
            return False
    except OSError:
        return True  # no claims directory to write: the bind test below still holds


def free_port() -> int:
    """A loopback TCP port nothing listens on now, free until someone binds it.

    Taken below the kernel's ephemeral range, so an outgoing connection (which gets its
    local port from that range) cannot take it between now and the server's bind, and
    claimed machine-wide, so two processes (two pytest-xdist workers, a test and the
    ``uns bench`` it runs) never hand out the same one: both once made a server of one
    test unable to listen (the simulator's Modbus port; a RabbitMQ node's distribution
    port). Never one this process handed out before."""
    low = max(10_000, _ephemeral_low() - 12_000)
    high = _ephemeral_low() - 1
    with contextlib.suppress(OSError):
        _CLAIMS.mkdir(exist_ok=True)
    for _ in range(500):
        port = random.randint(low, high) if high > low else 0
        if port in _HANDED_OUT or (port and not _claim(port)):
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                port = int(s.getsockname()[1])
        except OSError:
            continue  # a server listens there (not one of ours)
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high} (claims in {_CLAIMS})")


def memory_url() -> str:
    """The URL of a new in-memory broker of this process (``memory://test-<random>``)."""
    return f"memory://test-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def memory_broker() -> AsyncIterator[str]:
    """A new in-memory broker's URL for the block; forgotten after it (retained messages
    included), so no test sees another's."""
    url = memory_url()
    try:
        yield url
    finally:
        MemoryBroker._registry.pop(url.removeprefix("memory://"), None)


@asynccontextmanager
async def running(
    service_cls: type[Service[Any]],
    url: str,
    enterprise: str = "test",
    /,
    *,
    site: str = "pune",
    plant: list[tuple[str, str] | Device] | None = None,
    **settings: Any,
) -> AsyncIterator[Node[Any]]:
    """Run ``service_cls`` against ``url`` under ``enterprise``/``site`` for the block, and
    yield its `Node` once connected (its births are on their way); stop it cleanly after
    (its death published, its tasks ended). A crash of the service raises here.

    ``settings`` are decoded like the service's section of a config file (nested dicts
    allowed; ``metrics_port`` 0 unless given: any free port); ``plant`` gives the config's
    ``plant.devices`` as (device path, asset type) pairs or `Device` entries (relations).
    """
    config = UnsConfig(
        namespace=Namespace(enterprise=enterprise, site=site),
        plant=Plant(
            devices=[
                d if isinstance(d, Device) else Device(path=d[0], asset=d[1]) for d in plant or []
            ]
        ),
    )
    s = msgspec.convert({"metrics_port": 0, **settings}, service_cls.Settings, from_attributes=True)
    node: Node[Any] = Node(service_cls.name, s, config, broker_url=url, version="test")
    stop = asyncio.Event()
    task = asyncio.create_task(node.serve(service_cls(node), stop))
    connected = asyncio.create_task(node.connected.wait())
    await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        connected.cancel()
        task.result()  # raises why it did not start
    try:
        yield node
    finally:
        stop.set()
        await task


class Watcher:
    """The messages of one subscription, collected as they arrive, and waits on them."""

    timeout: float = 10.0
    """How long a wait waits unless told (a subclass may wait longer)."""
    quiet: float | None = None
    """`wait` fails early once nothing arrived for this long, unless told (None: never)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.messages: list[Message] = []
        """Every message received so far, in order."""
        self.seen: list[Message] = []
        """The messages `wait_for` and `next` went through (each wait starts after them)."""
        self.changed = asyncio.Event()
        """Set whenever a message arrives (or the subscription ends)."""
        self.error: BaseException | None = None
        """Why the subscription ended (the connection was lost), once it did."""

    async def _collect(self) -> None:
        try:
            async for message in self.bus.messages():
                self.messages.append(message)
                self.changed.set()
        except Exception as exc:
            self.error = exc
            self.changed.set()

    async def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float | None = None
    ) -> Message:
        """The next message (after those already waited through) that ``predicate`` accepts."""
        timeout = timeout or self.timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while len(self.seen) < len(self.messages):
                        message = self.messages[len(self.seen)]
                        self.seen.append(message)
                        if predicate(message):
                            return message
                    if self.error is not None:
                        raise self.error
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(
                self._missed(f"no message accepted by {_name(predicate)}", timeout)
            ) from None

    async def wait_topic(
        self, suffix: str, timeout: float | None = None, *, nonempty: bool = True
    ) -> Any:
        """The decoded payload of the next message whose topic ends with ``suffix`` (an
        empty payload, a cleared retained message, is passed over unless ``nonempty`` is
        false, and then None)."""
        m = await self.wait_for(
            lambda m: m.topic.endswith(suffix) and (bool(m.payload) or not nonempty), timeout
        )
        return decode(m.payload) if m.payload else None

    @overload
    async def next(self, topic_filter: str, kind: type[T], timeout: float | None = None) -> T: ...
    @overload
    async def next(
        self, topic_filter: str, kind: None = None, timeout: float | None = None
    ) -> Any: ...
    async def next(self, topic_filter: str, kind: Any = None, timeout: float | None = None) -> Any:
        """The payload of the next non-empty message on a topic ``topic_filter`` matches,
        decoded as ``kind`` (any payload of the contract by default)."""
        m = await self.wait_for(
            lambda m: bool(m.payload) and matches(topic_filter, m.topic), timeout
        )
        return decode(m.payload, Payload if kind is None else kind)

    async def wait(
        self,
        condition: Callable[[], bool],
        timeout: float | None = None,
        *,
        quiet: float | None = None,
        why: Callable[[], str] = str,
    ) -> None:
        """Until ``condition`` (over `messages`, say) holds. With ``quiet``, fail early once
        nothing arrived for that long: a lost message never comes, no need to wait out
        ``timeout`` for it. ``why`` adds to the failure's message."""
        timeout = timeout or self.timeout
        quiet = quiet or self.quiet
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    if self.error is not None:
                        raise self.error
                    self.changed.clear()
                    try:
                        await asyncio.wait_for(self.changed.wait(), quiet)
                    except TimeoutError:
                        raise AssertionError(f"nothing more arrived for {quiet} s{why()}") from None
        except TimeoutError:
            raise TimeoutError(
                self._missed(f"{_name(condition)} still false{why()}", timeout)
            ) from None

    async def publish(
        self, topic: str, payload: Payload | bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the watcher's own connection (a payload of the contract is encoded)."""
        data = payload if isinstance(payload, bytes) else encode(payload)
        await self.bus.publish(topic, data, qos=qos, retain=retain)

    def _missed(self, what: str, timeout: float) -> str:
        topics = sorted({m.topic for m in self.messages[-200:]})
        shown = ", ".join(topics[:10]) + (
            f" and {len(topics) - 10} more" if len(topics) > 10 else ""
        )
        return f"{what} within {timeout} s ({len(self.messages)} messages received: {shown or '-'})"


def _name(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", repr(f))


@asynccontextmanager
async def watching(
    url: str | None,
    topic_filter: str = "#",
    *,
    qos: int = 1,
    watcher: type[W] = Watcher,  # type: ignore[assignment]
    **connect_options: Any,
) -> AsyncIterator[W]:
    """A `Watcher` (or a subclass of it) subscribed to ``topic_filter`` on its own
    connection for the block. ``connect_options`` go to `uns.connect` (``settings`` for
    TLS or a login, ``client_id``, ``protocol=5`` for user properties)."""
    async with connect(url, **connect_options) as bus:
        await bus.subscribe(topic_filter, qos=qos)
        w = watcher(bus)
        task = asyncio.create_task(w._collect())
        try:
            yield w
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
