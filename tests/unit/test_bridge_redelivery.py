"""A message the local broker sends the bridge again (a persistent session resumed after a
restart or a ``kill -9``, before the bridge's acknowledgement reached it) is journaled
once: it keeps its one id, so the remote's filter on ids removes every copy."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from uns import Inbound
from uns.membus import MemoryBroker
from uns.testing import running
from uns_bridge import Bridge
from uns_bridge.journal import TAKEN_KEPT, Item, Journal

TOPIC = "acme/pune/stamping/line-3/cell-a/press-01/features/data"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def item(n: int, *, redelivered: bool = False) -> Item:
    return Item(TOPIC, b'{"n":%d}' % n, redelivered=redelivered)


def payloads(j: Journal) -> list[bytes]:
    return [r.payload for r in j.read(0, 100_000)]


def test_a_redelivered_message_already_taken_is_not_journaled_again_even_after_delivery(
    path: Path,
) -> None:
    j = Journal(path, max_bytes=2**30)
    j.append([item(1), item(2)])
    j.delete([r.id for r in j.read(0, 10)])  # forwarded and acknowledged by the remote
    got = j.append([item(2, redelivered=True), item(3)])
    assert got.duplicates == 1
    assert payloads(j) == [b'{"n":3}']
    j.close()


def test_a_redelivered_message_never_taken_is_journaled(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    j.append([item(1)])
    got = j.append([item(2, redelivered=True)])  # received, killed before the commit
    assert got.duplicates == 0 and payloads(j) == [b'{"n":1}', b'{"n":2}']
    j.close()


def test_the_same_bytes_published_again_without_the_dup_flag_are_a_new_message(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    j.append([item(1)])
    assert j.append([item(1)]).duplicates == 0
    assert payloads(j) == [b'{"n":1}', b'{"n":1}']
    j.close()


def test_what_was_taken_before_a_kill_is_still_recognised_after_the_restart(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    j.append([item(i) for i in range(5)])
    j.db.close()  # no clean close: as after a kill -9
    again = Journal(path, max_bytes=2**30)
    got = again.append([item(i, redelivered=True) for i in range(3, 8)])
    assert got.duplicates == 2
    assert payloads(again) == [b'{"n":%d}' % i for i in range(8)]
    again.close()


def test_two_copies_in_one_commit_are_journaled_once(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    got = j.append([item(1, redelivered=True), item(1, redelivered=True), item(2)])
    assert got.duplicates == 1 and payloads(j) == [b'{"n":1}', b'{"n":2}']
    assert got.last_id - got.first_id == 1
    j.close()


def test_the_digests_kept_stay_bounded(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    for k in range(10):
        j.append([item(1000 * k + i) for i in range(100)])
    kept = j.db.execute("SELECT COUNT(*) FROM taken").fetchone()[0]
    assert kept == TAKEN_KEPT
    # the oldest are forgotten: past the window a redelivery is journaled again
    assert j.append([item(0, redelivered=True)]).duplicates == 0
    assert j.append([item(9099, redelivered=True)]).duplicates == 1
    j.close()


def test_a_journal_written_before_the_digests_existed_opens_and_works(path: Path) -> None:
    j = Journal(path, max_bytes=2**30)
    j.append([item(1)])
    j.db.execute("DROP TABLE taken")
    j.close()
    again = Journal(path, max_bytes=2**30)
    assert payloads(again) == [b'{"n":1}']
    assert again.append([item(1, redelivered=True)]).duplicates == 0  # not known: kept
    assert again.append([item(1, redelivered=True)]).duplicates == 1
    again.close()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---- the bridge acknowledges to the local broker after the commit ------------------------


def Delivered(
    topic: str,
    payload: msgspec.Raw,
    retained: bool,
    ack: Callable[[], None],
    redelivered: bool = False,
) -> Inbound[msgspec.Raw]:
    """What the runtime hands the bridge's handlers for a persistent session: the message
    and its acknowledgement (`Inbound` with ``ack`` and ``redelivered``)."""
    return Inbound(topic, payload, retained, ack, redelivered)


@pytest.fixture
def offline_remote() -> Iterator[str]:
    name = f"cloud-{uuid.uuid4().hex[:8]}"
    MemoryBroker.named(name).stop()  # refuses connections: everything stays in the journal
    yield f"memory://{name}"
    MemoryBroker._registry.pop(name, None)


async def test_a_message_is_acknowledged_only_once_committed_and_an_excluded_one_at_once(
    memory_url: str, offline_remote: str, prefix: str, tmp_path: Path
) -> None:
    features = f"{prefix}/pune/stamping/line-3/cell-a/press-01/features/data"
    raw = f"{prefix}/pune/stamping/line-3/cell-a/press-01/features/debug"
    acked: dict[str, int] = {}
    async with running(
        Bridge,
        memory_url,
        prefix,
        remote={"url": offline_remote, "allow_plaintext": True, "reconnect_min_s": 5.0},
        include=["+/+/+/+/+/+/features/#"],
        exclude=["+/+/+/+/+/+/features/debug"],
        journal={"path": str(tmp_path / "j.sqlite")},
    ) as node:
        bridge: Bridge = node.running  # type: ignore[assignment]
        async with asyncio.timeout(10):
            while bridge.journal is None:  # opened by run(), set with `changed`
                bridge.changed.clear()
                await bridge.changed.wait()
        take = bridge._taker(0)
        changed = asyncio.Event()

        def ack_of(name: str) -> Callable[[], None]:
            def ack() -> None:  # what the journal held at the moment of the PUBACK
                assert bridge.journal is not None
                acked[name] = bridge.journal.count
                changed.set()

            return ack

        await take(Delivered(raw, msgspec.Raw(b"{}"), False, ack_of("excluded")))
        assert acked == {"excluded": 0}, "excluded: acknowledged at once, never journaled"
        await take(Delivered(features, msgspec.Raw(b'{"n":1}'), False, ack_of("first")))
        async with asyncio.timeout(10):
            while "first" not in acked:
                changed.clear()
                await changed.wait()
        assert acked["first"] == 1, "acknowledged after its commit"

        again = Delivered(features, msgspec.Raw(b'{"n":1}'), False, ack_of("again"), True)
        await take(again)  # sent again after a restart: acknowledged, not journaled twice
        async with asyncio.timeout(10):
            while "again" not in acked:
                changed.clear()
                await changed.wait()
        assert acked["again"] == 1
        duplicates = node.metrics.registry.get_sample_value(
            "uns_bridge_duplicates_total", {"service": "bridge"}
        )
    assert duplicates == 1
