"""Benchmark of the bridge's journal alone (no MQTT): ``python services/bridge/bench_journal.py``.

Prints the write rate of 300-byte messages for several group-commit sizes with
``synchronous=FULL`` and ``NORMAL``, the read-and-delete rate (what a back-fill costs the
journal), the bytes on disk per message, how fast the space comes back after delivery,
and the time to drain a one-hour backlog of the example plant at the default back-fill
rate. The journal file goes to a temporary directory beside the working directory
(``--dir`` to choose the disk you will run on: tmpfs would flatter the fsyncs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from uns_bridge.journal import Item, Journal

TOPIC = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
PAYLOAD = b"x" * 300
PLANT_PER_HOUR = 6 * (1 + 1) * 3600  # 6 devices x (features + scores) per second


def write_rate(path: Path, n: int, batch: int, synchronous: str) -> tuple[float, Journal]:
    journal = Journal(path, max_bytes=2**40, synchronous=synchronous)  # type: ignore[arg-type]
    items = [Item(TOPIC, PAYLOAD) for _ in range(batch)]
    started = time.perf_counter()
    for _ in range(n // batch):
        journal.append(items)
    return n / (time.perf_counter() - started), journal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("-n", type=int, default=100_000, help="messages per measurement")
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=args.dir) as tmp:
        print(f"journal benchmark in {tmp}, {len(PAYLOAD)}-byte payloads, topic {len(TOPIC)} B")
        print("write rate (messages/s) by messages per transaction:")
        for synchronous in ("full", "normal"):
            rates = []
            for batch in (1, 10, 100, 1000):
                count = min(n, 2000 * batch)  # one fsync per commit: keep small batches short
                path = Path(tmp) / f"w-{synchronous}-{batch}.sqlite"
                rate, journal = write_rate(path, count, batch, synchronous)
                journal.close()
                rates.append(f"{batch:>5}: {rate:>9,.0f}")
            print(f"  synchronous={synchronous:<6} " + "  ".join(rates))

        path = Path(tmp) / "backlog.sqlite"
        rate, journal = write_rate(path, n, 1000, "full")
        used = journal.used_bytes() / journal.count
        disk = journal.disk_bytes() / journal.count
        print(f"bytes per message: {used:,.0f} in the database, {disk:,.0f} on disk with the WAL")

        started = time.perf_counter()
        cursor, delivered = 0, 0
        while rows := journal.read(cursor, 1000):
            cursor = rows[-1].id
            for k in range(0, len(rows), 200):  # acknowledged in chunks, as the service does
                delivered += journal.delete(r.id for r in rows[k : k + 200])
        drain = delivered / (time.perf_counter() - started)
        print(f"read + delete after delivery: {drain:,.0f} messages/s")

        before = journal.disk_bytes()
        started = time.perf_counter()
        while journal.reclaim():
            pass
        print(
            f"space given back: {before / 2**20:.1f} MiB -> {journal.disk_bytes() / 2**20:.2f} MiB"
            f" in {time.perf_counter() - started:.2f} s"
        )
        journal.close()

        print(
            f"one hour of the example plant: {PLANT_PER_HOUR:,} messages,"
            f" {PLANT_PER_HOUR * disk / 2**20:.1f} MiB of journal;"
            f" drained in {PLANT_PER_HOUR / 2000:.1f} s at the default backfill_rate 2,000/s"
            f" (the journal alone could go {PLANT_PER_HOUR / drain:.1f} s)"
        )
        print(f"512 MiB (the default cap) holds {512 * 2**20 / disk:,.0f} messages")


if __name__ == "__main__":
    main()
