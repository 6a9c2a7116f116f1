"""``uns up``: the broker and every service as supervised child processes.

A child that exits is restarted with exponential backoff (reset after a minute
of good running); SIGINT/SIGTERM stops the services first, then the broker.

Liveness, not only exit: each child's event loop refreshes a heartbeat file every
second (`uns.watchdog`); a child whose heartbeat is older than ``liveness_s`` is stuck
(its own watchdog should have ended it already, unless something holds the GIL or the
watchdog is off) and is killed, which the broker reports as its death, then restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from uns.watchdog import HEARTBEAT_ENV

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    heartbeat: Path | None = None
    """The file its event loop keeps fresh (set at start when liveness is checked)."""
    beat_seen: tuple[float, float] | None = None
    """The heartbeat file's last mtime and the (monotonic) time it was first seen."""


def uns_argv(*args: str) -> list[str]:
    """The command line that runs ``uns ARGS`` with this interpreter."""
    return [sys.executable, "-m", "uns", *args]


SUPERVISOR_ENV = "UNS_SUPERVISOR_PID"
"""Set by `uns up` for its children: the pid they follow (`follow_supervisor`)."""
_PR_SET_PDEATHSIG = 1


def follow_supervisor() -> None:
    """End this process (SIGTERM: it stops cleanly, its death published) when the `uns up`
    that started it dies, even by ``kill -9``: its children run in sessions of their own
    (so a terminal's Ctrl-C reaches the supervisor alone) and would otherwise live on,
    orphaned, holding their ports and publishing as if supervised. Linux only (prctl);
    a no-op elsewhere and outside `uns up`."""
    expected = os.environ.pop(SUPERVISOR_ENV, None)  # not inherited by what we start
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != expected:  # it died before we asked to follow it
        os.kill(os.getpid(), signal.SIGTERM)


LIVENESS_S = 60.0
"""A child whose loop has not ticked for this long is killed and restarted (twice the
services' default ``loop_watchdog_s``: their own watchdog, with a clearer log line, is
meant to act first)."""


async def _start(child: Child, heartbeats: Path | None = None) -> None:
    env = {**os.environ, **child.env, SUPERVISOR_ENV: str(os.getpid())}
    if heartbeats is not None:
        child.heartbeat = heartbeats / f"{child.name}.heartbeat"
        child.heartbeat.unlink(missing_ok=True)  # a new process: no beat until it ticks
        child.beat_seen = None
        env[HEARTBEAT_ENV] = str(child.heartbeat)
    # its own process group: a terminal's Ctrl-C reaches `uns up` alone, which then stops
    # the services first and the broker last (so nobody sees its broker vanish first)
    child.process = await asyncio.create_subprocess_exec(
        *child.argv, env=env, start_new_session=True
    )
    log.info("started %s (pid %d)", child.name, child.process.pid)


def _stuck_for(child: Child) -> float | None:
    """Seconds since the child's loop last ticked; None before its first tick.

    Measured as how long the file's mtime has not changed, on the monotonic clock: the
    wall clock may step (NTP at boot) and must not make every child look stuck.
    """
    if child.heartbeat is None:
        return None
    try:
        mtime = child.heartbeat.stat().st_mtime
    except OSError:
        return None
    now = time.monotonic()
    if child.beat_seen is None or child.beat_seen[0] != mtime:
        child.beat_seen = (mtime, now)
    return now - child.beat_seen[1]


async def _wait_alive(child: Child, liveness_s: float) -> int:
    """Wait for the child to exit; kill it first if its loop is stuck past ``liveness_s``."""
    assert child.process is not None
    exited = asyncio.create_task(child.process.wait())
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=1.0)
            if done:
                return exited.result()
            stuck = _stuck_for(child) if liveness_s > 0 else None
            if stuck is not None and stuck > liveness_s and child.process.returncode is None:
                log.warning(
                    "%s (pid %d) is stuck: its event loop has not run for %.0f s; killing it"
                    " so that it is restarted",
                    child.name,
                    child.process.pid,
                    stuck,
                )
                child.process.kill()
                return await exited
    finally:
        exited.cancel()


async def _keep_running(
    child: Child,
    stop: asyncio.Event,
    liveness_s: float = LIVENESS_S,
    heartbeats: Path | None = None,
) -> None:
    delay = 0.5
    while not stop.is_set():
        started = time.monotonic()
        await _start(child, heartbeats)
        assert child.process is not None
        code = await _wait_alive(child, liveness_s)
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


async def _port_open(
    host: str, port: int, timeout_s: float, login: tuple[str, str] | None = None
) -> bool:
    """Wait until the broker accepts an MQTT connection (a bare TCP probe makes amqtt log
    an error about a client that sent nothing); with ``login`` (a broker that refuses
    anonymous clients), as that user."""
    from uns.bus import connect
    from uns.config import BrokerSettings
    from uns.errors import BusError

    user, password = login or (None, None)
    settings = BrokerSettings(username=user, password=password)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with connect(
                f"mqtt://{host}:{port}", client_id="uns-up-probe", timeout_s=2, settings=settings
            ):
                return True
        except BusError:
            await asyncio.sleep(0.1)
    return False


async def supervise(
    broker: Child | None,
    services: list[Child],
    *,
    broker_address: tuple[str, int] | None = None,
    broker_login: tuple[str, str] | None = None,
    stop: asyncio.Event | None = None,
    liveness_s: float = LIVENESS_S,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``), then stop services, then the broker.

    ``liveness_s``: a child whose event loop has not ticked for this long is killed and
    restarted (0: only exits are watched). ``broker_login``: the user the readiness probe
    logs in as (a secure broker refuses an anonymous probe).
    """
    stop = stop or asyncio.Event()
    heartbeats = Path(tempfile.mkdtemp(prefix="uns-up-")) if liveness_s > 0 else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        if broker is not None:
            tasks.append(asyncio.create_task(_keep_running(broker, stop, liveness_s, heartbeats)))
            if broker_address and not await _port_open(
                *broker_address, timeout_s=15, login=broker_login
            ):
                log.warning("the broker is not accepting connections yet; services will retry")
        for child in services:
            tasks.append(asyncio.create_task(_keep_running(child, stop, liveness_s, heartbeats)))
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
        if heartbeats is not None:
            shutil.rmtree(heartbeats, ignore_errors=True)
