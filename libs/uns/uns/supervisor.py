"""``uns up``: the broker and every service as supervised child processes.

A child that exits is restarted with exponential backoff (reset after a minute
of good running); SIGINT/SIGTERM stops the services first, then the broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


def uns_argv(*args: str) -> list[str]:
    """The command line that runs ``uns ARGS`` with this interpreter."""
    return [sys.executable, "-m", "uns", *args]


async def _start(child: Child) -> None:
    env = {**os.environ, **child.env}
    # its own process group: a terminal's Ctrl-C reaches `uns up` alone, which then stops
    # the services first and the broker last (so nobody sees its broker vanish first)
    child.process = await asyncio.create_subprocess_exec(
        *child.argv, env=env, start_new_session=True
    )
    log.info("started %s (pid %d)", child.name, child.process.pid)


async def _keep_running(child: Child, stop: asyncio.Event) -> None:
    delay = 0.5
    while not stop.is_set():
        started = time.monotonic()
        await _start(child)
        assert child.process is not None
        code = await child.process.wait()
        if stop.is_set():
            return
        if time.monotonic() - started > 60:
            delay = 0.5
        child.restarts += 1
        log.warning(
            "%s exited with code %d; restarting in %.1f s (restart %d)",
            child.name,
            code,
            delay,
            child.restarts,
        )
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 30.0)


async def _terminate(children: list[Child], timeout_s: float = 10.0) -> None:
    running = [c for c in children if c.process and c.process.returncode is None]
    for c in running:
        assert c.process is not None
        c.process.send_signal(signal.SIGTERM)
    for c in running:
        assert c.process is not None
        try:
            await asyncio.wait_for(c.process.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", c.name, timeout_s)
            c.process.kill()
            await c.process.wait()


async def _port_open(host: str, port: int, timeout_s: float) -> bool:
    """Wait until the broker accepts an MQTT connection (a bare TCP probe makes amqtt log
    an error about a client that sent nothing)."""
    from uns.bus import connect
    from uns.errors import BusError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with connect(f"mqtt://{host}:{port}", client_id="uns-up-probe", timeout_s=2):
                return True
        except BusError:
            await asyncio.sleep(0.1)
    return False


async def supervise(
    broker: Child | None,
    services: list[Child],
    *,
    broker_address: tuple[str, int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``), then stop services, then the broker."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        if broker is not None:
            tasks.append(asyncio.create_task(_keep_running(broker, stop)))
            if broker_address and not await _port_open(*broker_address, timeout_s=15):
                log.warning("the broker is not accepting connections yet; services will retry")
        for child in services:
            tasks.append(asyncio.create_task(_keep_running(child, stop)))
        await stop.wait()
        log.info("stopping %d services", len(services))
    finally:
        await _terminate(services)
        if broker is not None:
            await _terminate([broker])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
