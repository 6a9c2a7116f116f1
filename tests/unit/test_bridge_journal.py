"""The bridge's journal: SQLite as a durable FIFO with a TTL, a disk cap and no loss."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uns_bridge.journal import EVENT, RETAIN, TELEMETRY, Item, Journal, JournalFull

TOPIC = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
EVENTS = "acme/pune/stamping/line-3/cell-a/press-01/events/anomaly"


def items(n: int, *, start: int = 0, size: int = 300, priority: int = TELEMETRY) -> list[Item]:
    topic = EVENTS if priority == EVENT else TOPIC
    return [
        Item(topic, f"{start + i:08d}".encode() + b"x" * (size - 8), priority) for i in range(n)
    ]


def numbers(journal: Journal) -> list[int]:
    return [int(r.payload[:8]) for r in journal.read(0, 10**6)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "journal.sqlite"


def test_messages_come_back_in_the_order_they_were_taken_and_leave_only_when_deleted(path):
    j = Journal(path, max_bytes=2**30)
    j.append(items(5))
    j.append(items(5, start=5))
    rows = j.read(0, 100)
    assert [int(r.payload[:8]) for r in rows] == list(range(10))
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert j.read(rows[3].id, 2) == rows[4:6]  # a cursor reads on without deleting
    assert j.delete([rows[0].id, rows[1].id, rows[5].id]) == 3
    assert numbers(j) == [2, 3, 4, 6, 7, 8, 9]
    assert j.delete([rows[0].id]) == 0  # delivered twice (a duplicate PUBACK): no harm
    assert j.count == 7
    j.close()


def test_the_file_is_created_in_wal_mode_with_incremental_vacuum(path):
    j = Journal(path, max_bytes=2**30)
    assert path.exists()
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert j.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # full
    j.close()
    normal = Journal(path, max_bytes=2**30, synchronous="normal")
    assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    normal.close()


def test_ids_keep_growing_when_the_journal_empties_and_when_the_file_is_recreated(path):
    j = Journal(path, max_bytes=2**30)
    first = j.append(items(3))
    j.delete(range(first.first_id, first.last_id + 1))
    assert j.count == 0
    second = j.append(items(1))
    assert second.first_id == first.last_id + 1  # AUTOINCREMENT: never reused
    j.close()
    reopened = Journal(path, max_bytes=2**30)
    assert reopened.append(items(1)).first_id == second.last_id + 1
    reopened.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    recreated = Journal(path, max_bytes=2**30)  # the file was lost: ids start at now (µs)
    assert recreated.append(items(1)).first_id > second.last_id
    recreated.close()


def test_messages_older_than_the_ttl_expire_oldest_first(path):
    j = Journal(path, max_bytes=2**30)
    now = int(time.time() * 1000)
    j.append([Item(TOPIC, b"old-1", ts_ms=now - 10_000), Item(TOPIC, b"old-2", ts_ms=now - 6_000)])
    j.append([Item(TOPIC, b"new", ts_ms=now - 1_000)])
    assert j.oldest_ts_ms == now - 10_000
    assert j.expire(5, now_ms=now) == 2
    assert [r.payload for r in j.read(0, 10)] == [b"new"]
    assert j.oldest_ts_ms == now - 1_000
    assert j.expire(5, now_ms=now) == 0
    j.close()


def test_at_the_disk_cap_the_oldest_telemetry_goes_first_and_events_last(path):
    cap = 128 * 1024
    j = Journal(path, max_bytes=cap)
    j.append(items(20, start=0, size=1000, priority=EVENT))
    dropped_telemetry = 0
    for k in range(20):  # 400 kB of telemetry into a 128 kB journal
        got = j.append(items(20, start=1000 + 20 * k, size=1000))
        dropped_telemetry += got.cap_telemetry
        assert got.cap_event == 0
        assert j.used_bytes() <= cap
    left = numbers(j)
    assert left[:20] == list(range(20))  # every event survived
    telemetry = left[20:]
    assert 40 < len(telemetry) < 100  # what fits in 128 kB (3 rows per 4 kB page) with them
    assert telemetry == list(range(1400 - len(telemetry), 1400))  # the newest, contiguous
    assert dropped_telemetry == 400 - len(telemetry)
    assert j.count == len(left)

    # only events left to drop: the oldest events go
    got = j.append(items(200, start=5000, size=1000, priority=EVENT))
    assert got.cap_telemetry == len(telemetry) and got.cap_event > 0
    left = numbers(j)
    assert left == list(range(5200 - len(left), 5200))
    assert j.used_bytes() <= cap
    j.close()


def append_batches(j: Journal, n: int) -> None:
    for k in range(n):
        j.append(items(50, start=100 + 50 * k))


def test_a_full_disk_refuses_the_batch_and_keeps_the_journal_intact(path):
    j = Journal(path, max_bytes=2**30)
    j.append(items(10))
    pages = j.db.execute("PRAGMA page_count").fetchone()[0]
    j.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # "database or disk is full" soon
    with pytest.raises(JournalFull, match="full"):
        append_batches(j, 100)
    assert j.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = numbers(j)
    assert kept[:10] == list(range(10)) and len(kept) % 50 == 10  # whole batches or nothing
    assert j.count == len(kept)
    j.delete([r.id for r in j.read(0, 10**6)])  # deliveries make room again
    j.append(items(10, start=9000))
    assert numbers(j) == list(range(9000, 9010))
    j.close()


def test_disk_space_is_given_back_once_the_backlog_is_delivered(path):
    j = Journal(path, max_bytes=2**30)
    for k in range(20):
        j.append(items(1000, start=1000 * k))
    full = j.disk_bytes()
    per_message = j.used_bytes() / j.count
    assert 300 < per_message < 500  # a 300-byte payload plus topic and row overhead
    while rows := j.read(0, 5000):
        j.delete([r.id for r in rows])
    assert j.free_bytes() > 0.9 * full - 8 * 2**20
    while j.reclaim():
        pass
    assert j.disk_bytes() < 100_000 < full
    j.close()


_WRITER = """
import sys
from uns_bridge.journal import Item, Journal
j = Journal(sys.argv[1], max_bytes=2**30)
n = 0
while True:
    j.append([Item("a/b", b"%08d" % (n + i)) for i in range(100)])
    n += 100
    if n % 1000 == 0:
        print(n, flush=True)
"""


def test_a_kill_9_in_the_middle_of_writes_leaves_every_committed_message(path):
    path.parent.mkdir(parents=True)
    p = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    while int(p.stdout.readline()) < 3000:  # it keeps writing while we read this
        pass
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        Journal(path, max_bytes=2**30)  # one bridge per journal
    p.send_signal(signal.SIGKILL)
    p.wait()
    j = Journal(path, max_bytes=2**30)  # the dead process's lock went with it
    assert j.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    got = [int(r.payload) for r in j.read(0, 10**7)]
    assert len(got) >= 3000 and len(got) % 100 == 0  # whole transactions only
    assert got == list(range(len(got)))  # in order, nothing missing
    j.close()


def test_a_file_that_is_not_a_journal_is_refused(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Journal(path, max_bytes=2**30)


def test_retained_flag_and_priority_are_stored(path):
    j = Journal(path, max_bytes=2**30)
    j.append([Item("a/b/birth", b"{}", EVENT, RETAIN)])
    (row,) = j.read(0, 1)
    assert row.flags == RETAIN and row.topic == "a/b/birth" and row.payload == b"{}"
    j.close()
