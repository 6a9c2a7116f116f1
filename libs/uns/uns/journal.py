"""The durable journal: an SQLite file between the plant and an outbound peer (no MQTT
here). The bridge journals messages for the remote broker in it, the notifier its work
orders for the webhook (each with its own file).

A message is *taken* once its INSERT is committed, and leaves only when the remote
acknowledged it (`delete`), when it is older than the TTL (`expire`) or when the disk
cap needs its room (`append`: the oldest telemetry first, events and births last).

* WAL mode: a reader never blocks the writer; a commit is one sequential append.
* ``synchronous=FULL`` by default: each group commit is fsynced, so it survives a
  power cut as well as a ``kill -9`` (NORMAL survives the kill only). Commits are
  grouped by the caller (everything that arrived during the previous commit), so the
  fsync costs latency, not throughput (see `uns bench bridge`).
* ``AUTOINCREMENT`` keeps row ids monotonic even when the table empties, and the first
  id of a new file is the creation time in microseconds, so ids (the remote's
  duplicate filter keys) never repeat even if the file is deleted.
* ``auto_vacuum=INCREMENTAL``: `reclaim` gives the pages of delivered messages back
  to the file system once the backlog is gone.
* A full disk (SQLite's "database or disk is full", also raised at ``max_page_count``)
  rolls the transaction back and raises `JournalFull`; the file stays consistent.
* ``locking_mode=EXCLUSIVE``: a second process opening the same file gets "database is
  locked" instead of sending every message a second time. The OS releases the lock
  when the holder dies, ``kill -9`` included.
* ``taken`` keeps a digest of the last `TAKEN_KEPT` messages taken (committed with them):
  a message the local broker sends *again* (``Item.redelivered``: it was journaled but
  not yet acknowledged when the bridge stopped or was killed) and already taken is
  not journaled twice, so it keeps its one id and the remote's filter on ids suffices.

Not thread-safe: one thread (the service's journal executor) makes every call.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal, NamedTuple

from uns.journal_records import EVENT, RETAIN, TELEMETRY, Item, Row

__all__ = [
    "EVENT",
    "RETAIN",
    "TAKEN_KEPT",
    "TELEMETRY",
    "Appended",
    "Item",
    "Journal",
    "JournalFull",
    "Row",
]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS taken (id INTEGER PRIMARY KEY, digest INTEGER NOT NULL);
"""
_FORMAT: Final = "1"
TAKEN_KEPT: Final = 256
"""Digests of taken messages kept to recognise a redelivery: far more than a local
broker keeps in flight to one client (Mosquitto: max_inflight_messages, 20)."""


class Appended(NamedTuple):
    first_id: int
    last_id: int
    cap_telemetry: int
    """Messages dropped to stay under the disk cap (oldest telemetry first)..."""
    cap_event: int
    """...then the oldest events, when nothing else is left."""
    duplicates: int = 0
    """Redelivered items already taken: not journaled again."""


class JournalFull(Exception):
    """The disk (or ``max_page_count``) is full: nothing of the batch was written."""


class Journal:
    """The store-and-forward queue in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        synchronous: Literal["full", "normal"] = "full",
        max_page_count: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=1.0
        )
        db = self.db
        # one bridge per journal: a second one would send every message twice
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # effective only on a new file
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute("PRAGMA journal_size_limit = 8388608")  # the WAL shrinks back to 8 MiB
        if max_page_count is not None:
            db.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.strip().split(";\n"):
                if statement.strip():
                    db.execute(statement)
            fmt = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if fmt is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
                # ids start at the creation time in µs: a recreated file never reuses one
                db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)",
                    (time.time_ns() // 1000,),
                )
            elif fmt[0] != _FORMAT:
                raise sqlite3.DatabaseError(f"{self.path}: journal format {fmt[0]!r} unknown")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.page_size: int = db.execute("PRAGMA page_size").fetchone()[0]
        self.count: int = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self.oldest_ts_ms: int | None = None
        self._refresh_oldest()

    # ---- the queue ---------------------------------------------------------------------

    def append(self, items: Sequence[Item]) -> Appended:
        """Insert ``items`` in one transaction (all or nothing), then respect the cap.

        A redelivered item already taken is left out (counted in ``duplicates``)."""
        now = time.time_ns() // 1_000_000
        db = self.db
        with self._transaction():
            digests = [_digest(i) for i in items]
            fresh: list[tuple[Item, int]] = []
            seen: set[int] = set()
            for item, digest in zip(items, digests):
                if item.redelivered and (
                    digest in seen
                    or db.execute("SELECT 1 FROM taken WHERE digest = ?", (digest,)).fetchone()
                ):
                    continue
                seen.add(digest)
                fresh.append((item, digest))
            db.executemany(
                "INSERT INTO messages (ts_ms, priority, flags, topic, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                [(i.ts_ms or now, i.priority, i.flags, i.topic, i.payload) for i, _ in fresh],
            )
            last_id = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
            first_id = last_id - len(fresh) + 1
            db.executemany(
                "INSERT INTO taken (id, digest) VALUES (?, ?)",
                [(first_id + k, d) for k, (_, d) in enumerate(fresh)],
            )
            db.execute("DELETE FROM taken WHERE id <= ?", (last_id - TAKEN_KEPT,))
            dropped = self._enforce_cap(self.count + len(fresh))
        self.count += len(fresh) - dropped[0] - dropped[1]
        if self.oldest_ts_ms is None or dropped != (0, 0):
            self._refresh_oldest()
        return Appended(first_id, last_id, dropped[0], dropped[1], len(items) - len(fresh))

    def read(self, after_id: int, limit: int) -> list[Row]:
        """The next ``limit`` messages after ``after_id``, in journal order."""
        rows = self.db.execute(
            "SELECT id, ts_ms, flags, topic, payload FROM messages WHERE id > ?"
            " ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Row(*r) for r in rows]

    def delete(self, ids: Iterable[int]) -> int:
        """Forget delivered messages (ids already gone are ignored); return how many went."""
        ranges = _ranges(sorted(set(ids)))
        if not ranges:
            return 0
        with self._transaction():
            cur = self.db.executemany("DELETE FROM messages WHERE id BETWEEN ? AND ?", ranges)
            n = max(cur.rowcount, 0)
        self.count -= n
        self._refresh_oldest()
        return n

    def expire(self, ttl_s: float, now_ms: int | None = None) -> int:
        """Drop messages taken more than ``ttl_s`` ago; return how many."""
        if now_ms is None:
            now_ms = time.time_ns() // 1_000_000
        cutoff = now_ms - int(ttl_s * 1000)
        if self.oldest_ts_ms is None or self.oldest_ts_ms >= cutoff:
            return 0
        total = 0
        while True:  # the expired messages are the oldest: delete from the front in chunks
            with self._transaction():
                cur = self.db.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                    " WHERE ts_ms < ? ORDER BY id LIMIT 10000)",
                    (cutoff,),
                )
                n = max(cur.rowcount, 0)
            total += n
            self.count -= n
            self._refresh_oldest()
            if n < 10000 or self.oldest_ts_ms is None or self.oldest_ts_ms >= cutoff:
                return total

    # ---- disk --------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of the database holding messages (its free pages excluded)."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self.page_size

    def free_bytes(self) -> int:
        return int(self.db.execute("PRAGMA freelist_count").fetchone()[0]) * self.page_size

    def disk_bytes(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def reclaim(self, max_pages: int = 4096) -> int:
        """Give up to ``max_pages`` free pages back to the file system (incremental vacuum,
        about 30 ms per 1,000 pages) and shrink the WAL; return how many were released."""
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        if free == 0:
            return 0
        n = min(free, max_pages)
        try:
            # executescript steps the pragma to the end (execute() frees one page per call)
            self.db.executescript(f"PRAGMA incremental_vacuum({int(n)});")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise JournalFull(str(exc)) from None
            raise
        return n

    def close(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError:
            pass  # a full disk: the WAL stays and is replayed on the next open
        self.db.close()

    # ---- internals ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; a full disk -> JournalFull."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise JournalFull(str(exc)) from None
            raise

    def _enforce_cap(self, count: int) -> tuple[int, int]:
        """Inside the append transaction: delete the oldest telemetry, then the oldest
        events, until the database is back under the cap (95% of it, so that the next
        commits do not each have to delete again)."""
        used = self.used_bytes()
        if used <= self.max_bytes:
            return (0, 0)
        target = int(self.max_bytes * 0.95)
        dropped = [0, 0]
        for priority in (TELEMETRY, EVENT):
            while used > target:
                per_row = max(used // max(count, 1), 1)
                n = max((used - target) // per_row, 1)
                cur = self.db.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                    " WHERE priority = ? ORDER BY id LIMIT ?)",
                    (priority, n),
                )
                deleted = max(cur.rowcount, 0)
                if deleted == 0:
                    break  # none of this priority left
                dropped[priority] += deleted
                count -= deleted
                used = self.used_bytes()
            if used <= target:
                break
        return (dropped[0], dropped[1])

    def _refresh_oldest(self) -> None:
        row = self.db.execute("SELECT ts_ms FROM messages ORDER BY id LIMIT 1").fetchone()
        self.oldest_ts_ms = None if row is None else int(row[0])


def _digest(item: Item) -> int:
    """64 bits of BLAKE2b of topic and payload: a false match among the last `TAKEN_KEPT`
    is about 1 in 10^13; 8 bytes a row keep the table a few pages."""
    h = hashlib.blake2b(item.topic.encode(), digest_size=8)
    h.update(b"\0")
    h.update(item.payload)
    return int.from_bytes(h.digest(), "big", signed=True)


def _is_full(exc: sqlite3.OperationalError) -> bool:
    return "full" in str(exc).lower()


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """``[1, 2, 3, 7, 8]`` -> ``[(1, 3), (7, 8)]``."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out
