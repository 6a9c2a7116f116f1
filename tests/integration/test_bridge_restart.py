"""The bridge restarted mid-stream (``kill -9``) between two real Mosquittos loses nothing
the local broker accepted.

The plant publishes a numbered stream at QoS 1; a number counts as *accepted* once the
local Mosquitto acknowledged it. The bridge runs as its own process (``uns run bridge``)
and is killed with SIGKILL while the stream goes on: its persistent local session makes
the broker keep what is published while it is down, and it acknowledges a message to the
broker only once it is in its journal, so a message it had received and not committed
is sent to it again. The cloud application must see every accepted number; copies are
allowed only with the same ``uns-id`` (the remote's filter on ids removes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from clitools import Proc, start
from fixtures.brokers import Mosquitto, started_mosquitto
from fixtures.proxy import Proxy
from uns import DeviceData, Metric, connect, decode, encode
from uns.bus import Message
from uns.testing import Watcher, watching

pytestmark = pytest.mark.integration

FEATURES_ONLY = ["+/+/+/+/+/+/features/#"]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Mosquitto]:
    """The plant's broker, holding up to 10,000 messages for a client that is away (as
    deploy/mosquitto does; Mosquitto's default of 1,000 is 5 s of this stream, less than
    a restart of the bridge takes on a loaded machine)."""
    broker = started_mosquitto(tmp_path, name="local", extra="max_queued_messages 10000\n")
    yield broker
    broker.kill()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = started_mosquitto(tmp_path, name="cloud")
    yield broker
    broker.kill()


class Reader(Watcher):
    """The cloud application, on the cloud Mosquitto over MQTT 5 (ids as user properties);
    a wait fails once nothing more reached the cloud for 10 s (a lost message never comes:
    no need to wait out the whole timeout for it)."""

    timeout = 60.0
    quiet = 10.0

    def numbers(self) -> set[int]:
        return {number(m) for m in self.messages}

    def same_id_copies(self) -> int:
        """Copies the remote's filter on ``uns-id`` removes."""
        ids = [m.user_properties["uns-id"] for m in self.messages]
        return len(ids) - len(set(ids))

    def copies_under_new_ids(self) -> int:
        """Copies that filter cannot remove: a number journaled twice."""
        ids: dict[int, set[str]] = defaultdict(set)
        for m in self.messages:
            ids[number(m)].add(m.user_properties["uns-id"])
        return sum(len(v) - 1 for v in ids.values())


@contextlib.asynccontextmanager
async def reading(cloud: Mosquitto) -> AsyncIterator[Reader]:
    async with watching(
        cloud.url, "+/+/+/+/+/+/features/#", watcher=Reader, client_id="cloud-app", protocol=5
    ) as reader:
        yield reader


def lost(reader: Reader, accepted: list[int]) -> Callable[[], str]:
    def why() -> str:
        missing = sorted(set(accepted) - reader.numbers())
        return f": {len(missing)} of {len(accepted)} accepted messages lost, {missing[:5]}..."

    return why


def number(m: Message) -> int:
    value = decode(m.payload, DeviceData).metrics[0].value
    assert isinstance(value, int)
    return value


class Stream:
    """The plant: a numbered features stream at QoS 1 on the local broker."""

    def __init__(self, url: str, prefix: str, total: int, rate: float) -> None:
        self.url, self.prefix, self.total, self.rate = url, prefix, total, rate
        self.accepted: list[int] = []
        self.progress = asyncio.Event()

    async def run(self) -> list[int]:
        async with connect(self.url, client_id="plant") as plant:
            t0 = time.monotonic()
            for i in range(self.total):
                topic = f"{self.prefix}/pune/stamping/line-3/cell-a/press-{i % 3:02d}/features/data"
                data = DeviceData(ts=int(time.time() * 1000), node="f", seq=i % 256, metrics=[])
                data = msgspec.structs.replace(data, metrics=[Metric("n", i)])
                await plant.publish(topic, encode(data), qos=1)  # returns on the PUBACK
                self.accepted.append(i)
                self.progress.set()
                await asyncio.sleep(max(0.0, t0 + (i + 1) / self.rate - time.monotonic()))
        return self.accepted

    def start(self) -> asyncio.Task[list[int]]:
        self.task = asyncio.create_task(self.run())
        return self.task

    async def until(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` numbers are accepted (raises what stopped the stream, if it stopped)."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) < n:
                self.progress.clear()
                await asyncio.wait(
                    {self.task, asyncio.ensure_future(self.progress.wait())},
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self.task.done():
                    self.task.result()
                    break


def bridge_config(
    tmp_path: Path, prefix: str, local: Mosquitto, remote_port: int, name: str
) -> Path:
    config = {
        "namespace": {"enterprise": prefix, "site": "pune"},
        "broker": {"url": local.url},
        "services": {
            "bridge": {
                "metrics_port": 0,
                "include": FEATURES_ONLY,
                "remote": {
                    "url": f"mqtt://127.0.0.1:{remote_port}",
                    "allow_plaintext": True,
                    "inflight": 20,
                    "reconnect_min_s": 0.1,
                    "reconnect_max_s": 1.0,
                    "timeout_s": 3.0,
                },
                "journal": {"path": str(tmp_path / f"{name}.sqlite")},
            }
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(msgspec.yaml.encode(config))
    return path


async def run_bridge(procs: list[Proc], config: Path) -> Proc:
    args = ("run", "bridge", "--config", str(config))
    return await asyncio.to_thread(start, procs, *args, ready="births published")


async def test_kill_9_of_the_bridge_mid_stream_loses_nothing_the_local_broker_accepted(
    local: Mosquitto, cloud: Mosquitto, prefix: str, tmp_path: Path, procs: list[Proc]
) -> None:
    config = bridge_config(tmp_path, prefix, local, cloud.port, "edge")
    stream = Stream(local.url, prefix, total=2000, rate=200)  # 10 s
    async with reading(cloud) as reader:
        bridge = await run_bridge(procs, config)
        running = stream.start()
        await reader.wait(lambda: len(reader.numbers()) >= 200)
        bridge.stop(signal.SIGKILL)  # mid-stream: about 1 s in
        killed_at = len(stream.accepted)
        await stream.until(killed_at + 400)  # 2 s of the stream while it is down
        again = await run_bridge(procs, config)
        accepted = await running
        await reader.wait(lambda: set(accepted) <= reader.numbers(), why=lost(reader, accepted))
        assert "Traceback" not in "".join(again.lines)
    assert len(accepted) == 2000
    assert reader.copies_under_new_ids() == 0, "a message journaled twice"
    # at-least-once on the remote side: what was in flight to it (remote.inflight) and
    # what it acknowledged in the last 50 ms before the kill, under the same ids
    assert reader.same_id_copies() <= 20 + 200, reader.same_id_copies()


async def test_kill_9_while_the_cloud_is_unreachable_loses_nothing_when_both_come_back(
    local: Mosquitto, cloud: Mosquitto, prefix: str, tmp_path: Path, procs: list[Proc]
) -> None:
    stream = Stream(local.url, prefix, total=2000, rate=200)  # 10 s
    async with Proxy(cloud.port) as wan, reading(cloud) as reader:
        config = bridge_config(tmp_path, prefix, local, wan.port, "edge")
        bridge = await run_bridge(procs, config)
        running = stream.start()
        await reader.wait(lambda: len(reader.numbers()) >= 100)
        wan.cut()  # the cloud is gone; the bridge journals what it takes
        await stream.until(len(stream.accepted) + 200)
        bridge.stop(signal.SIGKILL)  # and now the bridge dies too
        await stream.until(len(stream.accepted) + 300)  # published while both are away
        await run_bridge(procs, config)
        await stream.until(len(stream.accepted) + 100)
        wan.mend()
        accepted = await running
        await reader.wait(lambda: set(accepted) <= reader.numbers(), why=lost(reader, accepted))
    assert len(accepted) == 2000
    assert reader.copies_under_new_ids() == 0, "a message journaled twice"
    assert reader.same_id_copies() <= 20 + 200, reader.same_id_copies()
