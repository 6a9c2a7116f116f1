"""Fixtures: real brokers on free ports (amqtt in-process, Mosquitto as a subprocess)."""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Imported here, not lazily by the first `st.from_regex` inside a test: on Python 3.11.7,
# pytest rewriting (parsing) this module while hypothesis runs a test deep in its own stack
# can fail with "SystemError: AST constructor recursion depth mismatch" (seen in a whole-suite
# run, never alone).
import hypothesis.strategies._internal.regex  # noqa: F401
import pytest

from uns.membus import MemoryBroker

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prefix() -> str:
    """A unique top level, so tests sharing a broker never see each other's topics."""
    return f"t{uuid.uuid4().hex[:10]}"


# ---- in-memory -----------------------------------------------------------------------


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    MemoryBroker._registry.pop(name, None)


# ---- amqtt, in-process -------------------------------------------------------------------


class AmqttBroker:
    """The embedded broker (our `uns_broker.serve`) on a free port, stoppable and restartable."""

    def __init__(self, port: int, **settings: object) -> None:
        from uns_broker import BrokerServerSettings

        self.port = port
        self.settings = BrokerServerSettings(port=port, **settings)  # type: ignore[arg-type]
        self.url = f"mqtt://127.0.0.1:{port}"
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from uns_broker import serve

        self._stop = asyncio.Event()
        started = asyncio.Event()
        self._task = asyncio.create_task(serve(self.settings, self._stop, started))
        starter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({self._task, starter}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            starter.cancel()
            self._task.result()  # raises why it did not start

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
            self._task = None


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[AmqttBroker]:
    broker = AmqttBroker(free_port())
    await broker.start()
    yield broker
    await broker.stop()


# ---- Mosquitto, a subprocess --------------------------------------------------------------


class Mosquitto:
    """A real Mosquitto on a free port with a config written by the test."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "") -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # started as root, mosquitto would drop to user 'mosquitto' and lose our tmp files
            f"user {getpass.getuser()}\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"{extra}"
        )
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ready once it says it runs (an event, not a sleep)
            if "running" in line or "Error" in line:
                break
        if self.proc.poll() is not None or "Error" in line:
            raise RuntimeError(f"mosquitto did not start: {line.strip()}")
        # keep draining stderr so the pipe never fills
        import threading

        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not _mosquitto_available():
        if IN_CI:
            pytest.fail("mosquitto is not installed; .ci/run must install it")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.kill()


# ---- the same tests on every broker -------------------------------------------------------


@pytest.fixture(params=["memory", "amqtt", "mosquitto"])
async def any_broker(request: pytest.FixtureRequest, memory_url: str) -> AsyncIterator[str]:
    """The URL of each kind of broker in turn: the contract must hold on all of them."""
    if request.param == "memory":
        yield memory_url
    elif request.param == "amqtt":
        broker = AmqttBroker(free_port())
        await broker.start()
        try:
            yield broker.url
        finally:
            await broker.stop()
    else:
        yield request.getfixturevalue("mosquitto").url


# ---- real machine data (../shared/data, never copied into the repository) -----------------


@pytest.fixture
def datasets() -> Path:
    """``UNS_DATASETS``: skipped where unset on a user's machine, a failure in CI."""
    root = os.environ.get("UNS_DATASETS")
    if not root:
        if IN_CI:
            pytest.fail("UNS_DATASETS is not set; .ci/run sets it to ../shared/data")
        pytest.skip("UNS_DATASETS is not set (the real data sets live outside the repository)")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"UNS_DATASETS={root} is not a directory")
    return path


# ---- `uns` processes ----------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Background `uns` processes of a test, killed after it."""
    import signal

    started: list[Any] = []
    yield started
    for p in reversed(started):  # politely first: `uns up` then stops its children
        try:
            p.stop(signal.SIGTERM)
        except Exception:
            p.stop(signal.SIGKILL)
