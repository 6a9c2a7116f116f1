"""The store-and-forward bridge against a real Mosquitto playing the cloud.

The cloud listens with TLS only and REQUIRES client certificates (made by the test);
between the bridge and it sits `wan`, a TCP proxy standing for the plant's WAN link:
``cut()`` resets every connection and leaves new ones unanswered, ``mend()`` forwards
again. The cloud application (`Reader`) is connected to Mosquitto directly, so it sees
everything that arrives. The plant side is the in-memory broker (a local Mosquitto for
the ``kill -9`` test, where the bridge runs as a process). Waiting is for events or for
a state to be reached; the only fixed sleeps hold the outage and pace the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sqlite3
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clitools import Proc, start, uns
from fixtures.brokers import Mosquitto, need_mosquitto
from fixtures.logs import Records, capturing_logs
from fixtures.pki import CertAuthority
from fixtures.proxy import Proxy
from uns import DeviceData, Metric, NodeBirth, connect, decode, encode
from uns.bus import Message
from uns.config import BrokerSettings
from uns.membus import MemoryBroker
from uns.testing import Watcher, running, watching
from uns_bridge import Bridge

pytestmark = pytest.mark.integration

FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "timeout_s": 3.0}


# ---- the cloud --------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]
    bridge: tuple[Path, Path]
    reader: tuple[Path, Path]
    rogue_ca: Path
    rogue: tuple[Path, Path]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    ours = CertAuthority(d)
    (d / "rogue").mkdir()
    rogue = CertAuthority(d / "rogue", name="rogue CA")
    return Pki(
        ca=ours.ca,
        server=ours.issue("cloud", server=True),
        bridge=ours.issue("edge-01", days=30),
        reader=ours.issue("cloud-reader"),
        rogue_ca=rogue.ca,
        rogue=rogue.issue("edge-01"),
    )


@dataclass
class Cloud:
    broker: Mosquitto
    log: Path
    pki: Pki

    @property
    def port(self) -> int:
        return self.broker.port

    def log_line(self, pattern: str) -> str:
        for line in self.log.read_text().splitlines():
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no {pattern!r} in the cloud's log:\n{self.log.read_text()}")


def start_cloud(
    tmp_path: Path, pki: Pki, *, identity_as_username: bool = True, acl: str | None = None
) -> Cloud:
    need_mosquitto()
    log = tmp_path / f"cloud-{uuid.uuid4().hex[:6]}.log"
    cert, key = pki.server
    acl_line = ""
    if acl is not None:
        (tmp_path / "cloud.acl").write_text(acl)
        acl_line = f"acl_file {tmp_path / 'cloud.acl'}\n"
    broker = Mosquitto(
        tmp_path,
        extra=(
            f"cafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n"
            "require_certificate true\n"
            f"use_identity_as_username {'true' if identity_as_username else 'false'}\n"
            f"log_dest file {log}\n{acl_line}"
        ),
    )
    broker.start()
    return Cloud(broker, log, pki)


@pytest.fixture
def cloud(tmp_path: Path, pki: Pki) -> Iterator[Cloud]:
    c = start_cloud(tmp_path, pki)
    yield c
    c.broker.kill()


def wan(cloud: Cloud) -> Proxy:
    """The WAN link to the cloud: cut, a connection is held unanswered (a dead link)."""
    return Proxy(cloud.port, when_cut="hold")


class Reader(Watcher):
    """The cloud application: everything that reaches the cloud, with its MQTT 5 properties."""

    timeout = 20.0

    def data(self) -> list[Message]:
        return [m for m in self.messages if m.topic.endswith("/features/data")]

    def numbers(self) -> set[int]:
        return {number(m) for m in self.data()}

    def journaled(self) -> list[Message]:
        """What came from the journal: all but the bridge's link (its own birth and death,
        published on each connection, not journaled)."""
        return [m for m in self.messages if not re.search(r"/_node/bridge/(birth|death)$", m.topic)]

    def duplicates(self) -> int:
        ids = [m.user_properties["uns-id"] for m in self.data()]
        return len(ids) - len(set(ids))

    def assert_in_order(self) -> None:
        """First copies, per topic: numbers and journal ids only grow."""
        seen: set[str] = set()
        last: dict[str, tuple[int, int]] = {}
        for m in self.data():
            mid = m.user_properties["uns-id"]
            if mid in seen:
                continue
            seen.add(mid)
            key = (int(mid.rsplit("-", 1)[1]), number(m))
            assert m.topic not in last or last[m.topic] < key, (m.topic, last[m.topic], key)
            last[m.topic] = key


@contextlib.asynccontextmanager
async def reading(cloud: Cloud, topic_filter: str = "#") -> AsyncIterator[Reader]:
    cert, key = cloud.pki.reader
    settings = BrokerSettings(
        url=f"mqtts://127.0.0.1:{cloud.port}",
        ca_file=str(cloud.pki.ca),
        cert_file=str(cert),
        key_file=str(key),
    )
    async with watching(
        None, topic_filter, watcher=Reader, settings=settings, client_id="cloud-reader", protocol=5
    ) as reader:
        yield reader


# ---- the plant --------------------------------------------------------------------------


def number(m: Message) -> int:
    value = decode(m.payload, DeviceData).metrics[0].value
    assert isinstance(value, int)
    return value


def feature(prefix: str, i: int, devices: int = 2) -> tuple[str, bytes]:
    """The i-th message of a features stream over ``devices`` presses."""
    topic = f"{prefix}/pune/stamping/line-3/cell-a/press-{i % devices:02d}/features/data"
    data = DeviceData(ts=int(time.time() * 1000), node="featurizer", seq=i % 256, metrics=[])
    data = DeviceData(ts=data.ts, node=data.node, seq=data.seq, metrics=[Metric("n", i)])
    return topic, encode(data)


async def produce(url: str, prefix: str, numbers: range, rate: float | None = None) -> None:
    async with connect(url) as plant:
        t0 = time.monotonic()
        for k, i in enumerate(numbers):
            await plant.publish(*feature(prefix, i), qos=1)
            if rate:
                await asyncio.sleep(max(0.0, t0 + (k + 1) / rate - time.monotonic()))


def remote(cloud: Cloud, link: Proxy | None = None, **over: Any) -> dict[str, Any]:
    cert, key = cloud.pki.bridge
    return {
        "url": f"mqtts://127.0.0.1:{link.port if link else cloud.port}",
        "ca_file": str(cloud.pki.ca),
        "cert_file": str(cert),
        "key_file": str(key),
        **FAST,
        **over,
    }


FEATURES_ONLY = ["+/+/+/+/+/+/features/#"]


def metric(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, {"service": "bridge", **labels})
    return float(value or 0.0)


async def until(node: Any, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """A state the bridge reaches by itself (commits, deliveries, expiry): woken by its
    ``changed`` event."""
    bridge: Bridge = node.running
    async with asyncio.timeout(timeout):
        while True:
            bridge.changed.clear()
            if predicate():
                return
            await bridge.changed.wait()


async def scraped(proc: Proc, name: str, predicate: Callable[[float], bool]) -> None:
    """A process's metric reaching a value: polled over HTTP (a process boundary), for as
    long as a loaded machine may need (2,000 messages journaled took over 20 s in CI under
    other work); the limit only stops a hang."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if predicate(await asyncio.to_thread(_scrape, proc, name)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never got there: {await asyncio.to_thread(_scrape, proc, name)}")


@pytest.fixture
def logs() -> Iterator[Records]:
    with capturing_logs("uns_bridge", timeout=15.0) as handler:
        yield handler


# ---- 1. a WAN outage ----------------------------------------------------------------------


async def test_a_30_s_wan_outage_during_a_steady_stream_loses_nothing_and_keeps_order(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path, logs: Records
) -> None:
    journal = tmp_path / "journal.sqlite"
    total = 20 * 35  # 20 msg/s: 2 s before the outage, 30 s of it, 3 s after
    async with (
        wan(cloud) as link,
        reading(cloud) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud, link, inflight=20),
            include=FEATURES_ONLY,
            journal={"path": str(journal)},
        ) as node,
    ):
        stream = asyncio.create_task(produce(memory_url, prefix, range(total), rate=20))
        await reader.wait(lambda: len(reader.data()) >= 20)
        link.cut()
        await asyncio.sleep(30)  # the outage
        backlog = metric(node, "uns_bridge_journal_messages")
        oldest = metric(node, "uns_bridge_oldest_age_seconds")
        assert metric(node, "uns_bridge_remote_connected") == 0
        link.mend()
        await stream
        await reader.wait(lambda: reader.numbers() == set(range(total)))
        await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 0)

        assert 500 < backlog < 650 and 28 < oldest < 35  # what the outage held back
        reader.assert_in_order()
        assert reader.duplicates() <= 20  # at most remote.inflight after a connection loss
        assert metric(node, "uns_bridge_forwarded_total") >= total
        assert metric(node, "uns_bridge_reconnects_total") >= 1
        assert metric(node, "uns_bridge_remote_connected") == 1
        assert metric(node, "uns_bridge_seconds_since_delivery") == 0
        assert metric(node, "uns_bridge_dropped_total", reason="expired") == 0

    warnings = logs.of("uns_bridge")
    assert warnings and all("retrying in" in r.getMessage() for r in warnings)
    assert all(r.exc_info is None for r in logs.of("uns"))  # one line per attempt, no traceback
    assert len(warnings) <= 30  # jittered backoff, not a busy loop


# ---- 2. kill -9 ---------------------------------------------------------------------------


def _config(path: Path, prefix: str, local: str, section: dict[str, Any]) -> Path:
    import msgspec

    config = {
        "namespace": {"enterprise": prefix, "site": "pune"},
        "broker": {"url": local},
        "services": {"bridge": {"metrics_port": 0, **section}},
    }
    path.write_bytes(msgspec.yaml.encode(config))
    return path


def _scrape(proc: Proc, name: str) -> float:
    line = next(x for x in proc.lines if "metrics on http" in x)
    url = line.split("metrics on ", 1)[1].strip()
    with urllib.request.urlopen(url, timeout=2) as r:
        for text in r.read().decode().splitlines():
            if text.startswith(name + "{"):
                return float(text.rsplit(" ", 1)[1])
    return 0.0


async def test_kill_9_in_the_middle_of_a_backlog_then_a_restart_loses_nothing(
    cloud: Cloud, mosquitto: Mosquitto, prefix: str, tmp_path: Path, procs: list[Proc]
) -> None:
    total = 2000
    async with wan(cloud) as link, reading(cloud) as reader:
        config = _config(
            tmp_path / "edge.yaml",
            prefix,
            mosquitto.url,
            {
                "include": FEATURES_ONLY,
                "remote": remote(cloud, link, inflight=20),
                "journal": {"path": str(tmp_path / "journal.sqlite"), "backfill_rate": 500},
            },
        )
        link.cut()
        args = ("run", "bridge", "--config", str(config))
        bridge = await asyncio.to_thread(start, procs, *args, ready="births published")
        await produce(mosquitto.url, prefix, range(total))
        await scraped(bridge, "uns_bridge_journal_messages", lambda v: v >= total)
        link.mend()
        await reader.wait(lambda: len(reader.numbers()) >= 400)
        bridge.stop(signal.SIGKILL)  # mid-backlog: about 4 s of it at 500 msg/s
        delivered_before = len(reader.numbers())
        assert delivered_before < total

        again = await asyncio.to_thread(start, procs, *args, ready="births published")
        await reader.wait(lambda: reader.numbers() == set(range(total)), timeout=30)
        await scraped(again, "uns_bridge_journal_messages", lambda v: v == 0)
        assert "Traceback" not in "".join(again.lines)
    assert "messages waiting" in "".join(again.lines)
    reader.assert_in_order()
    # at-least-once: the unacknowledged window (inflight) plus what was acknowledged in the
    # last 50 ms before the kill (at 500 msg/s about 25)
    assert reader.duplicates() <= 20 + 200, reader.duplicates()


# ---- 3. restarted while the cloud is unreachable --------------------------------------------


async def test_a_bridge_restarted_while_the_cloud_is_down_delivers_everything_when_it_returns(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    async with wan(cloud) as link, reading(cloud) as reader:
        link.cut()
        section: dict[str, Any] = {
            "remote": remote(cloud, link),
            "include": FEATURES_ONLY,
            "journal": {"path": str(journal)},
        }
        async with running(Bridge, memory_url, prefix, **section) as node:
            await produce(memory_url, prefix, range(100))
            await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 100)
        async with running(Bridge, memory_url, prefix, **section) as node:
            await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 100)
            await produce(memory_url, prefix, range(100, 200))
            await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 200)
            link.mend()
            await reader.wait(lambda: reader.numbers() == set(range(200)))
    reader.assert_in_order()
    assert reader.duplicates() == 0


# ---- 4. the local broker restarts -------------------------------------------------------------


async def test_after_a_local_broker_restart_the_bridge_subscribes_again_and_loses_nothing(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    local = MemoryBroker.named(memory_url.removeprefix("memory://"))
    async with (
        wan(cloud) as link,
        reading(cloud) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud, link),
            journal={"path": str(tmp_path / "journal.sqlite")},
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
        ) as node,
    ):
        link.cut()
        await produce(memory_url, prefix, range(50))
        await until(node, lambda: metric(node, "uns_bridge_journal_messages") >= 50)
        local.stop()  # everything the bridge took is in its journal, not in the broker
        local.start()
        async with connect(memory_url) as watcher:  # births come after the subscriptions
            await watcher.subscribe(f"{prefix}/pune/_node/bridge/birth")
            async with asyncio.timeout(10):
                async for m in watcher.messages():
                    if m.payload:
                        break
        await produce(memory_url, prefix, range(50, 100))
        link.mend()
        await reader.wait(lambda: reader.numbers() == set(range(100)))
    reader.assert_in_order()
    births = [
        decode(m.payload, NodeBirth)
        for m in reader.messages
        if m.topic == f"{prefix}/pune/_node/bridge/birth" and m.payload
    ]
    # the remote hears of the bridge from its link alone (a birth per remote session, naming
    # the site it relays), never from the local births the journal took on every local session
    assert births and all(b.relays == [f"{prefix}/pune"] for b in births), births
    assert metric(node, "uns_reconnects_total") >= 1


# ---- 5. TTL, disk cap and a full disk ----------------------------------------------------------


@pytest.fixture
def offline_cloud() -> Iterator[tuple[str, MemoryBroker]]:
    """A cloud that refuses connections until started (the bridge's remote, plaintext)."""
    name = f"cloud-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.named(name)
    broker.stop()
    yield f"memory://{name}", broker
    MemoryBroker._registry.pop(name, None)


@contextlib.asynccontextmanager
async def collecting(url: str) -> AsyncIterator[Reader]:
    """The cloud application on the in-memory cloud."""
    async with watching(url, "#", watcher=Reader) as reader:
        yield reader


async def test_messages_older_than_the_ttl_are_dropped_and_counted_as_expired(
    offline_cloud: tuple[str, MemoryBroker], memory_url: str, prefix: str, tmp_path: Path
) -> None:
    url, cloud = offline_cloud
    async with running(
        Bridge,
        memory_url,
        prefix,
        remote={"url": url, "allow_plaintext": True, **FAST},
        include=FEATURES_ONLY,
        journal={"path": str(tmp_path / "j.sqlite"), "ttl_s": 1},
    ) as node:
        await produce(memory_url, prefix, range(20))
        await until(node, lambda: metric(node, "uns_bridge_expired_total") == 20)
        assert metric(node, "uns_bridge_dropped_total", reason="expired") == 20
        assert metric(node, "uns_bridge_journal_messages") == 0
        cloud.start()
        async with collecting(url) as reader:
            await produce(memory_url, prefix, range(20, 25))
            await reader.wait(lambda: len(reader.data()) == 5)
    assert reader.numbers() == set(range(20, 25))


async def test_at_the_disk_cap_the_oldest_telemetry_is_dropped_and_events_survive(
    offline_cloud: tuple[str, MemoryBroker], memory_url: str, prefix: str, tmp_path: Path
) -> None:
    url, cloud = offline_cloud
    pad = "x" * 900  # about 1 kB per message: 3 per 4 kB page
    events = f"{prefix}/pune/stamping/line-3/cell-a/press-00/events/anomaly"
    async with running(
        Bridge,
        memory_url,
        prefix,
        remote={"url": url, "allow_plaintext": True, **FAST},
        include=["+/+/+/+/+/+/features/#", "+/+/+/+/+/+/events/#"],
        journal={"path": str(tmp_path / "j.sqlite"), "max_bytes": 128 * 1024},
    ) as node:
        async with connect(memory_url) as plant:
            for i in range(10):
                data = DeviceData(ts=1, node="inference", seq=i, metrics=[Metric("n", i)])
                await plant.publish(events, encode(data)[:-1] + f',"pad":"{pad}"}}'.encode())
            for i in range(300):
                topic, payload = feature(prefix, 1000 + i)
                await plant.publish(topic, payload[:-1] + f',"pad":"{pad}"}}'.encode())

        def accounted() -> float:
            return metric(node, "uns_bridge_journal_messages") + metric(
                node, "uns_bridge_dropped_total", reason="cap_telemetry"
            )

        await until(node, lambda: accounted() == 310)
        kept = metric(node, "uns_bridge_journal_messages")
        assert metric(node, "uns_bridge_dropped_total", reason="cap_event") == 0
        assert 40 < kept - 10 < 120
        assert metric(node, "uns_bridge_journal_bytes") < 128 * 1024 + 8 * 2**20  # + the WAL
        cloud.start()
        async with collecting(url) as reader:
            await reader.wait(lambda: len(reader.journaled()) == kept)
    got = reader.journaled()
    assert sorted(number(m) for m in got if "/events/" in m.topic) == list(range(10))
    telemetry = sorted(number(m) for m in got if "/features/" in m.topic)
    assert telemetry == list(range(1300 - len(telemetry), 1300))  # the newest, none missing


async def test_a_full_disk_drops_new_messages_with_an_error_and_keeps_the_journal(
    offline_cloud: tuple[str, MemoryBroker],
    memory_url: str,
    prefix: str,
    tmp_path: Path,
    logs: Records,
) -> None:
    url, cloud = offline_cloud
    path = tmp_path / "j.sqlite"
    async with running(
        Bridge,
        memory_url,
        prefix,
        remote={"url": url, "allow_plaintext": True, **FAST},
        include=FEATURES_ONLY,
        journal={"path": str(path)},
    ) as node:
        bridge: Bridge = node.running  # type: ignore[assignment]
        await produce(memory_url, prefix, range(10))
        await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 10)

        def fill_disk() -> None:  # SQLite's own "database or disk is full"
            assert bridge.journal is not None
            pages = bridge.journal.db.execute("PRAGMA page_count").fetchone()[0]
            bridge.journal.db.execute(f"PRAGMA max_page_count = {pages}")

        await bridge._call(fill_disk)
        await produce(memory_url, prefix, range(10, 400))

        def full() -> float:
            return metric(node, "uns_bridge_dropped_total", reason="disk_full")

        await until(node, lambda: metric(node, "uns_bridge_journal_messages") + full() == 400)
        kept = metric(node, "uns_bridge_journal_messages")
        assert full() > 0 and kept >= 10
        await logs.wait(lambda: bool(logs.of("uns_bridge", logging.ERROR)))
        errors = logs.of("uns_bridge", logging.ERROR)
        assert len(errors) == 1  # one line per 10 s, not one per message
        assert "is full" in errors[0].getMessage() and errors[0].exc_info is None
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == kept
    check.close()
    cloud.start()  # what was taken is still delivered, by the next run
    async with (
        collecting(url) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote={"url": url, "allow_plaintext": True, **FAST},
            include=FEATURES_ONLY,
            journal={"path": str(path)},
        ),
    ):
        await reader.wait(lambda: len(reader.data()) == kept)
    assert sorted(reader.numbers())[:10] == list(range(10))


# ---- 6. refused connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("foreign client certificate", "the remote refused our client certificate"),
        ("no client certificate", "the remote requires a client certificate"),
        ("untrusted server", "the remote's certificate is not trusted (remote.ca_file)"),
    ],
)
async def test_a_refused_tls_connection_says_why_delivers_nothing_and_keeps_the_journal(
    case: str,
    cause: str,
    cloud: Cloud,
    memory_url: str,
    prefix: str,
    tmp_path: Path,
    logs: Records,
) -> None:
    over: dict[str, Any] = {"timeout_s": 2.0}
    if case == "foreign client certificate":
        over["cert_file"], over["key_file"] = map(str, cloud.pki.rogue)
    elif case == "no client certificate":
        over["cert_file"] = over["key_file"] = None
    else:
        over["ca_file"] = str(cloud.pki.rogue_ca)
    async with (
        reading(cloud) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud, **over),
            include=FEATURES_ONLY,
            journal={"path": str(tmp_path / "j.sqlite")},
        ) as node,
    ):
        await produce(memory_url, prefix, range(10))
        await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 10)
        # every attempt says why, and what it keeps (an attempt before the ten were
        # journaled, as under load, says fewer)
        kept = "10 messages kept in the journal"
        await logs.wait(
            lambda: any(
                cause in r.getMessage() and kept in r.getMessage() for r in logs.of("uns_bridge")
            )
        )
        assert reader.data() == []
        assert metric(node, "uns_bridge_remote_connected") == 0
    assert all(r.exc_info is None for r in logs.of("uns"))


async def test_messages_the_cloud_refuses_stay_in_the_journal_and_the_log_says_why(
    pki: Pki, memory_url: str, prefix: str, tmp_path: Path, logs: Records
) -> None:
    # the cloud's policy lets our certificate publish elsewhere only: MQTT 5 PUBACK 0x87
    acl = "user cloud-reader\ntopic read #\nuser edge-01\ntopic write elsewhere/#\n"
    cloud = start_cloud(tmp_path, pki, acl=acl)
    try:
        async with running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud),
            include=FEATURES_ONLY,
            journal={"path": str(tmp_path / "j.sqlite")},
        ) as node:
            await produce(memory_url, prefix, range(5))
            cause = "the remote refused a message (its policy or ACL for our topics)"
            await logs.wait(lambda: any(cause in r.getMessage() for r in logs.of("uns_bridge")))
            assert metric(node, "uns_bridge_forwarded_total") == 0
            assert metric(node, "uns_bridge_journal_messages") == 5
    finally:
        cloud.broker.kill()
    line = next(r.getMessage() for r in logs.of("uns_bridge") if "refused" in r.getMessage())
    assert "Not authorized" in line and "5 messages kept in the journal" in line


def test_a_plaintext_remote_is_refused_at_startup_unless_allowed(tmp_path: Path) -> None:
    config = _config(
        tmp_path / "edge.yaml",
        "acme",
        "mqtt://127.0.0.1:1",
        {"remote": {"url": "mqtt://cloud.example.com:1883"}},
    )
    r = uns("run", "bridge", "--config", str(config))
    assert r.returncode == 2
    assert "services.bridge.remote: url: 'mqtt://cloud.example.com:1883' is not encrypted" in (
        r.stderr
    )
    assert "Traceback" not in r.stderr


# ---- 7. presets on the wire --------------------------------------------------------------------


async def test_generic_preset_same_topics_ids_as_mqtt5_user_properties_retained_births(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    async with (
        reading(cloud) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud),
            journal={"path": str(tmp_path / "j.sqlite")},
        ) as node,
    ):
        await produce(memory_url, prefix, range(3))
        await reader.wait(lambda: len(reader.data()) == 3)
        birth = f"{prefix}/pune/_node/bridge/birth"
        await reader.wait(lambda: any(m.topic == birth for m in reader.messages))
        assert metric(node, "uns_bridge_cert_days_left") == pytest.approx(30, abs=0.01)
    topic, _payload = feature(prefix, 0)
    first = reader.data()[0]
    assert first.topic == topic and decode(first.payload, DeviceData).metrics[0].value == 0
    assert re.fullmatch(r"bridge-\d+", first.user_properties["uns-id"])
    assert "uns-topic" not in first.user_properties
    cloud.log_line(rf"as {prefix}-pune-bridge \(p5,")  # MQTT 5, default client id
    async with reading(cloud, birth) as late:  # a consumer that comes later learns the node
        await late.wait(lambda: bool(late.messages))
        assert late.messages[0].retain


async def test_aws_iot_preset_thing_name_as_client_id_and_the_uns_topic_as_it_is(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    async with (
        reading(cloud) as reader,
        running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud, preset="aws-iot", client_id="pune-press-shop"),
            include=FEATURES_ONLY,
            journal={"path": str(tmp_path / "j.sqlite")},
        ),
    ):
        await produce(memory_url, prefix, range(3))
        await reader.wait(lambda: len(reader.data()) == 3)
    assert [m.topic for m in reader.data()] == [feature(prefix, i)[0] for i in range(3)]
    assert all(m.user_properties["uns-id"].startswith("bridge-") for m in reader.data())
    cloud.log_line(r"as pune-press-shop \(p5,")


async def test_azure_iot_hub_preset_device_id_username_and_property_bag_on_mqtt_3(
    pki: Pki, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    cloud = start_cloud(tmp_path, pki, identity_as_username=False)
    try:
        async with (
            reading(cloud) as reader,
            running(
                Bridge,
                memory_url,
                prefix,
                remote={
                    **remote(cloud, preset="azure-iot-hub", client_id="edge-01"),
                    "url": f"mqtts://localhost:{cloud.port}",  # the hub's host name
                },
                include=FEATURES_ONLY,
                journal={"path": str(tmp_path / "j.sqlite")},
            ),
        ):
            await produce(memory_url, prefix, range(2))
            await reader.wait(lambda: len(reader.messages) == 2)
    finally:
        cloud.broker.kill()
    base = "devices/edge-01/messages/events/"
    for i, m in enumerate(reader.messages):
        assert m.topic.startswith(base + "$.ct=application%2Fjson&$.ce=utf-8&uns-topic=")
        bag = dict(kv.split("=", 1) for kv in m.topic[len(base) :].split("&"))
        assert urllib.parse.unquote(bag["uns-topic"]) == feature(prefix, i)[0]
        assert re.fullmatch(r"bridge-\d+", bag["uns-id"])
        assert m.user_properties == {}  # MQTT 3.1.1: no properties, the bag carries them
        assert decode(m.payload, DeviceData).metrics[0].value == i
    cloud.log_line(r"as edge-01 \(p2, c1, k60, u'localhost/edge-01/\?api-version=2021-04-12'\)")


async def test_batches_carry_many_messages_in_one_publish_with_their_ids(
    cloud: Cloud, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    async with wan(cloud) as link, reading(cloud) as reader:
        link.cut()
        async with running(
            Bridge,
            memory_url,
            prefix,
            remote=remote(cloud, link),
            include=FEATURES_ONLY,
            journal={"path": str(tmp_path / "j.sqlite"), "batch": 50},
        ) as node:
            await produce(memory_url, prefix, range(120))
            await until(node, lambda: metric(node, "uns_bridge_journal_messages") == 120)
            link.mend()
            await reader.wait(
                lambda: sum(int(m.user_properties["uns-count"]) for m in reader.journaled()) == 120
            )
    assert [int(m.user_properties["uns-count"]) for m in reader.journaled()] == [50, 50, 20]
    import json

    items = [item for m in reader.journaled() for item in json.loads(m.payload)]
    assert [item["payload"]["metrics"][0]["value"] for item in items] == list(range(120))
    assert all(m.topic == f"{prefix}/pune/_node/bridge/batch" for m in reader.journaled())
    ids = [int(item["id"].rsplit("-", 1)[1]) for item in items]
    assert ids == sorted(ids) and len(set(ids)) == 120


async def test_without_a_remote_the_bridge_idles_and_says_so(
    memory_url: str, prefix: str, logs: Records
) -> None:
    async with running(Bridge, memory_url, prefix) as node:
        await logs.wait(
            lambda: any(
                "no remote configured; the bridge is idle" in r.getMessage()
                for r in logs.of("uns_bridge", logging.INFO)
            )
        )
        assert node.connected.is_set()
        assert metric(node, "uns_bridge_remote_connected") == 0
