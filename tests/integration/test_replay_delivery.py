"""`uns replay` knows whether the broker took every row, and says so in its exit code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fixtures.brokers import AmqttBroker
from fixtures.ports import free_port
from uns import DevicePath, Node, decode
from uns.config import Namespace, UnsConfig
from uns.testing import watching
from uns_broker import AclEntry
from uns_replay import ReplaySettings, read_csv, replay
from uns_replay.service import IncompleteReplay

pytestmark = pytest.mark.integration


def rows_file(tmp_path: Path, n: int) -> Path:
    f = tmp_path / "values.csv"
    f.write_text("ts,a\n" + "".join(f"{1000 + i},{i}\n" for i in range(n)))
    return f


async def uns_replay(f: Path, device: str, url: str, *more: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uns", "replay", str(f), "--device", device),
        *("--speed", "0", "--broker", url, "--log-level", "INFO", *more),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.fixture
async def refusing_broker(prefix: str) -> AsyncIterator[AmqttBroker]:
    """An edge box's broker whose ACL lets anonymous clients publish only node messages:
    MQTT 3.1.1 acknowledges a refused QoS 1 message all the same and drops it."""
    acl = AclEntry(publish=[f"{prefix}/pune/_node/#"], subscribe=["#"])
    broker = AmqttBroker(free_port(), acl={"anonymous": acl})
    await broker.start()
    yield broker
    await broker.stop()


async def test_uns_replay_through_mosquitto_sees_every_row_back_and_exits_0(
    mosquitto, prefix, tmp_path
):
    device = f"{prefix}/pune/replay/line/cell/dev"
    async with watching(mosquitto.url, f"{device}/raw/data") as w:
        code, err = await uns_replay(rows_file(tmp_path, 500), device, mosquitto.url)
        got = [decode((await w.wait_for(lambda m: True)).payload) for _ in range(500)]
    assert code == 0, err
    assert "every one seen back from the broker" in err
    assert err.splitlines()[-1] == (
        f"500 rows published to {device}/raw/data, all 500 seen back from the broker"
    )
    assert [d.metrics[0].value for d in got] == list(range(500))


async def test_a_semicolon_export_replays_through_mosquitto_without_its_labels_to_its_end(
    mosquitto, prefix, tmp_path
):
    f = tmp_path / "export.csv"
    f.write_text(
        "time;temp;flow;anomaly\n"
        + "".join(f"2024-01-01 00:00:{i:02d};{20 + i};{i / 10};{int(i > 7)}\n" for i in range(10))
    )
    device = f"{prefix}/pune/replay/line/cell/dev"
    async with watching(mosquitto.url, f"{device}/raw/#") as w:
        code, err = await uns_replay(
            f, device, mosquitto.url, "--time-column", "time", "--ignore", "anomaly"
        )
        death = await w.wait_topic("/raw/death")  # what a recorder waits for
    assert code == 0, err
    assert err.splitlines()[-1] == (
        f"10 rows published to {device}/raw/data, all 10 seen back from the broker"
    )
    rows = [decode(m.payload) for m in w.messages if m.topic.endswith("/data")]
    assert [[m.name for m in d.metrics] for d in rows] == [["temp", "flow"]] * 10
    assert [d.ts for d in rows] == [1704067200000 + 1000 * i for i in range(10)]
    assert death.reason == "end of replay: 10 rows, 10 seen back"
    assert w.messages[-1].topic == f"{device}/raw/death"  # after every row


async def test_a_replay_whose_rows_the_broker_drops_exits_1_saying_how_many(
    refusing_broker, prefix, tmp_path
):
    device = f"{prefix}/pune/replay/line/cell/dev"
    code, err = await uns_replay(rows_file(tmp_path, 200), device, refusing_broker.url)
    assert code == 1
    assert f"error: 200 of 200 rows published to {device}/raw/data were not seen back" in err
    assert "Traceback" not in err


async def test_replay_raises_incomplete_replay_naming_the_rows_missing(
    refusing_broker, prefix, tmp_path
):
    node = Node(
        "replay",
        ReplaySettings(speed=0, metrics_port=0, confirm_timeout_s=2),
        UnsConfig(namespace=Namespace(enterprise=prefix)),
        broker_url=refusing_broker.url,
    )
    device = DevicePath(prefix, "pune", "replay", "line", "cell", "dev")
    # awaited in this task: a SystemExit raised in another task ends the event loop
    with pytest.raises(IncompleteReplay) as info:
        async with asyncio.timeout(120):
            await replay(node, device, read_csv(rows_file(tmp_path, 50)), asyncio.Event())
    assert isinstance(info.value, SystemExit)  # the command exits 1 with its message
    assert (info.value.sent, info.value.missing) == (50, 50)
