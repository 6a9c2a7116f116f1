"""The event-loop watchdog: a stuck service becomes a dead one, loudly.

A service whose event loop is blocked (a synchronous call in a handler, an endless loop)
stays connected: the broker sees its TCP connection and keepalive is answered by nobody
only after 1.5 keepalives; its node stays "online" and nothing restarts it. The watchdog
turns that into a crash that everything else already handles:

* a task ticks every `HEARTBEAT_S` on the loop (`LoopWatchdog.run`);
* a daemon thread, which needs no loop, checks the last tick; when the loop has not
  ticked for ``timeout_s`` it logs one line with the loop thread's current stack (so the
  bug is found) and ends the process with `WATCHDOG_EXIT_CODE` (``os._exit``: no cleanup
  that could itself wait for the loop). The broker sees the socket close and publishes
  the node's Last Will (its death); the supervisor restarts it;
* the ticks are metrics (``uns_loop_heartbeat_timestamp_seconds``, ``uns_loop_lag_seconds``),
  served by prometheus_client's own thread, so they answer while the loop is stuck;
* under ``uns up`` each tick also refreshes the mtime of the file named by `HEARTBEAT_ENV`,
  which the supervisor checks, so even a process whose watchdog cannot run (a C call
  holding the GIL) is found and restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger(__name__)

HEARTBEAT_ENV: Final = "UNS_HEARTBEAT_FILE"
"""Set by ``uns up`` for each child: the file whose mtime the loop's heartbeat refreshes."""
HEARTBEAT_S: Final = 1.0
"""How often the loop ticks (more often when ``timeout_s`` is below 4 of these)."""
WATCHDOG_EXIT_CODE: Final = 70
"""The exit code of a process whose event loop was stuck (``EX_SOFTWARE``: a bug)."""


class LoopWatchdog:
    """Heartbeat of one event loop, watched from a thread; ``timeout_s=0`` only beats."""

    def __init__(
        self,
        name: str,
        timeout_s: float,
        *,
        registry: CollectorRegistry | None = None,
        service: str = "",
        heartbeat_file: str | Path | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.heartbeat_file = Path(heartbeat_file) if heartbeat_file else None
        self._exit = exit
        self.every_s = min(HEARTBEAT_S, timeout_s / 4) if timeout_s > 0 else HEARTBEAT_S
        self._last = time.monotonic()
        self._loop_thread: int | None = None
        self._stopped = threading.Event()
        self._registry = registry
        self._gauges: list[Gauge] = []
        if registry is not None:
            stamp = Gauge(
                "uns_loop_heartbeat_timestamp_seconds",
                "Unix time of the event loop's last heartbeat (it ticks every second)",
                ["service"],
                registry=registry,
            )
            lag = Gauge(
                "uns_loop_lag_seconds",
                "Seconds since the event loop's last heartbeat, at the time of the scrape",
                ["service"],
                registry=registry,
            )
            lag.labels(service).set_function(lambda: time.monotonic() - self._last)
            self._stamp = stamp.labels(service)
            self._gauges = [stamp, lag]

    async def run(self) -> None:
        """Tick until cancelled, with the watching thread running meanwhile."""
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        thread = None
        if self.timeout_s > 0:
            thread = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
            thread.start()
        try:
            while True:
                self._tick()
                await asyncio.sleep(self.every_s)
        finally:
            self._stopped.set()
            for gauge in self._gauges:  # a node may serve again with the same registry
                assert self._registry is not None
                self._registry.unregister(gauge)
            self._gauges = []

    def stuck_for(self) -> float:
        """Seconds since the last tick."""
        return time.monotonic() - self._last

    def _tick(self) -> None:
        self._last = time.monotonic()
        if self._gauges:
            self._stamp.set(time.time())
        if self.heartbeat_file is not None:
            try:
                self.heartbeat_file.touch()
            except OSError as exc:
                log.warning(
                    "%s: cannot refresh the heartbeat file %s (%s): the supervisor's liveness"
                    " check will not see this process",
                    self.name,
                    self.heartbeat_file,
                    exc,
                )
                self.heartbeat_file = None

    def _watch(self) -> None:
        stale = False
        while not self._stopped.wait(self.every_s):
            stuck = self.stuck_for()
            if stuck < self.timeout_s:
                stale = False
                continue
            if not stale:
                # Seen once more before acting: after the whole process was not scheduled
                # (a loaded machine) this thread may simply wake before the loop does.
                stale = True
                continue
            self._report(stuck)
            self._exit(WATCHDOG_EXIT_CODE)
            return

    def _report(self, stuck: float) -> None:
        frame = sys._current_frames().get(self._loop_thread or -1)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        log.critical(
            "%s: the event loop has not run for %.1f s (loop_watchdog_s is %g): something"
            " blocks it; exiting with code %d so that the broker publishes this node's death"
            " and the supervisor restarts it. The loop's thread is at:\n%s",
            self.name,
            stuck,
            self.timeout_s,
            WATCHDOG_EXIT_CODE,
            where.rstrip("\n"),
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
