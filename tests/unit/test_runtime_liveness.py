"""A stuck service is visible: the event-loop watchdog, its metrics, the supervisor's check;
and what the runtime cannot send is counted, never lost in silence."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from fixtures.logs import capturing_logs
from uns import DevicePath, Metric, MetricDef, Node, Service, ServiceSettings
from uns.membus import MemoryBroker
from uns.supervisor import Child, _stuck_for
from uns.testing import running, watching
from uns.watchdog import WATCHDOG_EXIT_CODE, LoopWatchdog


def a_handler_that_blocks(until: threading.Event) -> None:
    until.wait(30)  # like time.sleep in a handler: the loop's thread is held


async def test_a_loop_blocked_past_the_bound_is_reported_with_its_stack_then_the_process_ends():
    exited = threading.Event()
    codes: list[int] = []

    def exit(code: int) -> None:
        codes.append(code)
        exited.set()

    watchdog = LoopWatchdog("stuck-01", 0.5, exit=exit)
    beat = asyncio.create_task(watchdog.run())
    await asyncio.sleep(0)  # it ticks once
    with capturing_logs("uns.watchdog") as logs:
        a_handler_that_blocks(exited)  # on the loop: nothing else runs until the exit
        beat.cancel()
    assert codes == [WATCHDOG_EXIT_CODE]
    (line,) = [r.getMessage() for r in logs.of("uns.watchdog", logging.CRITICAL)]
    assert "stuck-01: the event loop has not run for" in line
    assert "a_handler_that_blocks" in line and "until.wait(30)" in line  # where it hangs


async def test_a_loop_that_keeps_ticking_is_left_alone():
    codes: list[int] = []
    watchdog = LoopWatchdog("busy-01", 0.5, exit=codes.append)
    beat = asyncio.create_task(watchdog.run())
    for _ in range(20):  # 2 s of short, legitimate work between ticks
        time.sleep(0.05)  # noqa: ASYNC251 (the point: work that holds the loop a little)
        await asyncio.sleep(0.05)
    beat.cancel()
    assert codes == []


def test_a_negative_loop_watchdog_is_refused_naming_the_field():
    with pytest.raises(msgspec.ValidationError, match="loop_watchdog_s"):
        msgspec.convert({"loop_watchdog_s": -1}, ServiceSettings)


class Quiet(Service[ServiceSettings]):
    name = "quiet"


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("uns_loop_")
    }


async def test_the_heartbeat_metrics_answer_while_the_loop_is_stuck(memory_url, prefix):
    async with running(Quiet, memory_url, prefix, loop_watchdog_s=0) as node:
        before = _scrape(node.metrics_url)
        scraped: dict[str, float] = {}
        done = threading.Event()

        def scrape_later() -> None:
            time.sleep(2.0)  # the loop is held meanwhile
            scraped.update(_scrape(node.metrics_url))
            done.set()

        threading.Thread(target=scrape_later, daemon=True).start()
        a_handler_that_blocks(done)
    assert before["uns_loop_lag_seconds"] < 1.5
    assert abs(before["uns_loop_heartbeat_timestamp_seconds"] - time.time()) < 60
    assert scraped["uns_loop_lag_seconds"] >= 1.5  # grows while nothing ticks


async def test_under_uns_up_the_loop_keeps_a_heartbeat_file_fresh(
    memory_url, prefix, tmp_path, monkeypatch
):
    beat = tmp_path / "quiet.heartbeat"
    monkeypatch.setenv("UNS_HEARTBEAT_FILE", str(beat))
    child = Child("quiet", [], heartbeat=beat)
    async with running(Quiet, memory_url, prefix):
        assert _stuck_for(child) is not None
        first = beat.stat().st_mtime
        deadline = time.monotonic() + 30
        while beat.stat().st_mtime == first and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert beat.stat().st_mtime > first  # refreshed every second
        assert _stuck_for(child) < 5


def test_the_supervisor_measures_a_stale_heartbeat_on_its_own_clock(tmp_path: Path):
    beat = tmp_path / "x.heartbeat"
    child = Child("x", [], heartbeat=beat)
    assert _stuck_for(child) is None  # no tick yet: not judged
    beat.touch()
    assert _stuck_for(child) == pytest.approx(0, abs=0.5)
    time.sleep(0.3)
    assert _stuck_for(child) >= 0.3  # unchanged mtime: the time since it was first seen


class Sender(Service[ServiceSettings]):
    name = "sender"

    def __init__(self, node: Node[ServiceSettings]) -> None:
        super().__init__(node)
        self.path = DevicePath(node.enterprise, node.site, "a", "l", "c", "d")

    async def run(self) -> None:
        await self.node.device_birth(self.path, "raw", [MetricDef(name="n", datatype="int32")])


async def test_messages_still_queued_when_the_node_stops_are_counted_and_logged(memory_url, prefix):
    broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
    with capturing_logs("uns.runtime") as logs:
        async with running(Sender, memory_url, prefix) as node:
            broker.stop()
            for i in range(7):  # queued while the broker is away, never sent
                await node.device_data(node.running.path, "raw", [Metric(name="n", value=i)])
    assert node.metrics.dropped_count("shutdown") == 7
    assert any("7 queued messages not sent" in r.getMessage() for r in logs.of("uns.runtime"))


async def test_dropping_the_oldest_while_offline_is_logged_as_well_as_counted(memory_url, prefix):
    broker = MemoryBroker.named(memory_url.removeprefix("memory://"))
    with capturing_logs("uns.runtime") as logs:
        async with running(Sender, memory_url, prefix, queue_size=3) as node:
            broker.stop()
            for i in range(5):
                await node.device_data(node.running.path, "raw", [Metric(name="n", value=i)])
            broker.start()
            await node.drained()
    assert node.metrics.dropped_count("offline") == 2
    assert any("reason=offline" in r.getMessage() for r in logs.of("uns.runtime"))


@pytest.mark.parametrize(("stream", "qos"), [("raw", 0), ("features", 1), ("scores", 1)])
async def test_derived_streams_go_at_qos_1_by_default_and_raw_at_qos_0(
    memory_url, prefix, stream, qos
):
    async with (
        running(Sender, memory_url, prefix) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/{stream}/data") as w,
    ):
        path = node.running.path
        await node.device_data(path, stream, [Metric(name="n", value=1)])
        message = await w.wait_for(lambda m: m.topic.endswith("/data"))
    assert message.qos == qos
