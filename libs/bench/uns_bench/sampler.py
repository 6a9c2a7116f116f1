"""CPU and memory of the processes under test, sampled from /proc while a run goes on."""

from __future__ import annotations

import asyncio
import bisect
import time
from types import TracebackType

from uns_bench.procs import Usage, usage


class Sampler:
    """Samples ``{name: pid}`` every ``every_s``; CPU over any interval is interpolated."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2) -> None:
        self.pids = pids
        self.every_s = every_s
        self.times: list[float] = []
        self.samples: list[dict[str, Usage]] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.times.append(time.monotonic())
        self.samples.append({name: usage(pid) for name, pid in self.pids.items()})

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.sample()

    def _cpu_at(self, name: str, t: float) -> float:
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return self.samples[0][name].cpu_s
        if i >= len(self.times):
            return self.samples[-1][name].cpu_s
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = self.samples[i - 1][name].cpu_s, self.samples[i][name].cpu_s
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per wall second of each process between ``t0`` and ``t1``."""
        span = max(t1 - t0, 1e-9)
        return {
            name: round((self._cpu_at(name, t1) - self._cpu_at(name, t0)) / span, 3)
            for name in self.pids
        }

    def peak_rss(self) -> dict[str, float]:
        """VmHWM of each process at the last sample, MB."""
        out: dict[str, float] = {}
        for sample in self.samples:
            for name, u in sample.items():
                out[name] = round(max(out.get(name, 0.0), u.peak_rss_mb), 1)
        return out
