"""The services under test as child processes, and what /proc says about them.

Every service runs as its own ``uns ...`` process (as ``uns up`` runs it); the load
runs in another process (`in_process`). CPU seconds come from ``/proc/PID/stat``
(utime + stime), peak RSS from ``/proc/PID/status`` (VmHWM).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from uns.bus import connect
from uns.errors import BusError
from uns.testing import free_port as free_port  # the harness hands it to its scenarios

T = TypeVar("T")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """CPU seconds used so far and memory of one process."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def usage(pid: int) -> Usage:
    """What the kernel says of ``pid`` now (zeros once it has gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return Usage(0.0, 0.0, 0.0)
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    kb = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kb[key] = int(value.split()[0])
    return Usage(cpu, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


@dataclass
class Proc:
    """One service under test: a child process with its log in the work directory."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def usage(self) -> Usage:
        return usage(self.pid)

    def metrics(self) -> dict[str, float]:
        """The service's Prometheus samples, ``name{label=value,...}`` -> value."""
        if self.metrics_port is None:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (what `uns up` sends), then SIGKILL if it does not go."""
        self.terminate()
        self.wait_gone(timeout_s)

    def terminate(self) -> None:
        """SIGTERM, not waiting: processes stopped together go in the time of the slowest."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait_gone(self, timeout_s: float = 10.0) -> None:
        """Until it has exited after `terminate`; SIGKILL if it does not go."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    want = [f"{k}={v}" for k, v in labels.items()]
    total = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        have = rest.rstrip("}").split(",")
        if all(w in have for w in want):
            total += value
    return total


def uns_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "uns", *args]


class Procs:
    """The processes of one run, stopped (services first, brokers last) at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Proc] = []

    def uns(
        self, name: str, *args: str, env: dict[str, str] | None = None, metrics: bool = False
    ) -> Proc:
        port = free_port() if metrics else None
        extra = ["--metrics-port", str(port)] if port is not None else []
        proc = Proc(
            name, uns_argv(*args, *extra), self.workdir / f"{name}.log", env or {}, port
        ).start()
        self.all.append(proc)
        return proc

    def mosquitto(self, name: str = "mosquitto", port: int | None = None) -> tuple[Proc, str]:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        port = port or free_port()
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"user {getpass.getuser()}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            # a subscriber that falls behind must not lose QoS 0 messages silently
            "max_queued_messages 0\nmax_queued_bytes 0\n"
        )
        proc = Proc(name, [binary, "-c", str(conf)], self.workdir / f"{name}.log").start()
        self.all.append(proc)
        return proc, f"mqtt://127.0.0.1:{port}"

    def broker(self, name: str = "broker") -> tuple[Proc, str]:
        """The embedded broker (amqtt) as ``uns broker`` runs it."""
        port = free_port()
        proc = self.uns(name, "broker", "--host", "127.0.0.1", "--port", str(port))
        return proc, f"mqtt://127.0.0.1:{port}"

    def stop(self) -> None:
        """The services together (each says goodbye to a broker that is still there), then
        the brokers together."""
        brokers = [p for p in self.all if "broker" in p.name or "mosquitto" in p.name]
        for group in ([p for p in reversed(self.all) if p not in brokers], brokers):
            for p in group:
                p.terminate()
            for p in group:
                p.wait_gone()
        self.all.clear()


async def wait_broker(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with connect(url, client_id=f"bench-probe-{os.getpid()}", timeout_s=2):
                return
        except BusError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def wait_metric(
    proc: Proc,
    ready: Callable[[dict[str, float]], bool],
    timeout_s: float = 30.0,
    what: str = "",
) -> dict[str, float]:
    """Poll a service's /metrics until ``ready`` says so."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            samples = await asyncio.to_thread(proc.metrics)
            if ready(samples):
                return samples
        except OSError:
            pass  # not serving yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: not {what or 'ready'} within {timeout_s:g} s")
        await asyncio.sleep(0.2)


_POOL: concurrent.futures.ProcessPoolExecutor | None = None


def _pool() -> concurrent.futures.ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
    return _POOL


async def in_process(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in the load process (a separate interpreter, kept between runs)."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), fn, *args)


def load_pid() -> int | None:
    """The pid of the load process, once started (its CPU is reported too)."""
    if _POOL is None:
        return None
    procs = getattr(_POOL, "_processes", None) or {}
    return next(iter(procs), None)


def shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL = None
