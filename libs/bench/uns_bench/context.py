"""What every scenario gets: the work directory, how hard to go, the load levels asked for,
the broker ceilings measured in the run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uns import Message, connect


@dataclass
class Context:
    workdir: Path
    quick: bool
    repeats: int
    say: Callable[[str], None]
    machines: tuple[int, ...] = ()
    """The load levels asked for (``--machines``): machines (or devices) per row of a
    scenario that has a level; empty: each scenario's own levels."""
    brokers: tuple[str, ...] = ()
    """The brokers to run the vibration levels on (``--brokers``); empty: its own plan."""
    boxes: tuple[int, ...] = ()
    """The numbers of edge boxes to run the boxes scenario at (``--boxes``); empty: its own."""
    box_machines: int | None = None
    """Machines per synthetic box (``--box-machines``); None: the example plant's."""
    ceiling: dict[str, float] = field(default_factory=dict)
    """``{broker}/{message kind}`` -> messages/s measured by the broker scenario of this run
    (or by a quick measurement when it did not run); every rated row is compared with it."""

    def levels(self, default: tuple[int, ...], quick: tuple[int, ...]) -> tuple[int, ...]:
        """The machine counts to run: those asked for, else the scenario's (quick) ones."""
        return self.machines or (quick if self.quick else default)


async def running_once(run: Coroutine[Any, Any, None], ready: asyncio.Event) -> asyncio.Task[None]:
    """``run`` as a task, once it has set ``ready`` (its subscription is in place); what
    it raised if it ended before that."""
    task = asyncio.create_task(run)
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    return task


class Receiver:
    """A subscriber in the orchestrator: counts (and optionally keeps) what arrives."""

    def __init__(
        self,
        url: str,
        topic_filter: str,
        *,
        expect: int | None = None,
        keep: Callable[[Message, float], None] | None = None,
    ) -> None:
        self.url = url
        self.filter = topic_filter
        self.expect = expect
        self.keep = keep
        self.count = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.subscribed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Receiver:
        self.task = await running_once(self._run(), self.subscribed)
        return self

    async def _run(self) -> None:
        async with connect(self.url, client_id=f"bench-recv-{time.monotonic_ns()}") as bus:
            await bus.subscribe(self.filter)
            self.subscribed.set()
            async for message in bus.messages():
                now = time.monotonic()
                if message.retain or not message.payload:
                    continue  # what was there before, or a retained birth being cleared
                if not self.t_first:
                    self.t_first = now
                self.t_last = now
                self.count += 1
                if self.keep is not None:
                    self.keep(message, now)
                self.arrived.set()
                if self.expect is not None and self.count >= self.expect:
                    return

    async def settle(self, idle_s: float = 3.0, limit_s: float = 120.0) -> None:
        """Until ``expect`` messages arrived, nothing arrived for ``idle_s``, or ``limit_s``."""
        deadline = time.monotonic() + limit_s
        assert self.task is not None
        while not self.task.done() and time.monotonic() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), idle_s)
            except TimeoutError:
                break
        await self.stop()

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
