"""Scenario 5, the bridge: its journal alone (write rate, bytes on disk per message), then
the service as a process: back-fill rate to a second local broker acting as the cloud
after an outage, and the time to drain a 1-hour backlog of the example plant."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from uns import DeviceData, Metric, Window, encode, now_ms
from uns_bench import load
from uns_bench.context import Context
from uns_bench.procs import Procs, free_port, in_process, metric_sum, wait_broker, wait_metric
from uns_bench.report import Row, summarise
from uns_bench.sampler import Sampler

ENTERPRISE = "bench"
TOPIC = f"{ENTERPRISE}/pune/stamping/line-3/cell-a/press-01/features/data"
BATCHES = (1, 10, 100)
POLL_S = 0.05
_SHORT_DRAIN = f"drained within {{}} poll{{}} of {POLL_S:g} s: the rate is a lower bound"


def features_payload() -> bytes:
    """A features message of a press: what the bridge forwards most."""
    from uns_featurizer import WAVEFORM_UNITS

    names = [n for n in WAVEFORM_UNITS if n != "dominant_hz"] + ["band_10_1000"]
    t = now_ms()
    return encode(
        DeviceData(
            ts=t,
            node="featurizer",
            seq=17,
            metrics=[Metric(f"vibration.{n}", 0.123456789 * (i + 1)) for i, n in enumerate(names)],
            window=Window(
                start=t - 1000, end=t, good=10_000, total=10_000, seq_first=1, seq_last=10
            ),
        )
    )


def plant_messages_per_hour() -> int:
    """What the example plant sends to the cloud per hour with the default include filters:
    for the devices of uns-schema/plant.yaml, a features message per vibration window, one
    slow features message per device per hop (every slow tag of the device in it, since
    2026-12-02), and the scores of every window a model scores (`uns_bench.boxes.streams`:
    the rates the boxes scenario sends); births and the rare events apart."""
    from uns_bench.boxes import messages_per_s, plant_machines

    return round(messages_per_s(plant_machines()) * 3600)


# ---- the journal alone (in the load process) -------------------------------------------


def journal_rates(n: int, payload: bytes) -> dict[str, Any]:
    """Write rate by messages per transaction (synchronous=FULL), bytes on disk per message,
    read-and-delete rate (what a back-fill costs the journal)."""
    from uns_bridge import Journal, JournalItem

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=Path.cwd()) as tmp:
        for batch in BATCHES:
            count = min(n, 2000 * batch)  # one fsync per commit: keep small batches short
            journal = Journal(Path(tmp) / f"w{batch}.sqlite", max_bytes=2**40, synchronous="full")
            items = [JournalItem(TOPIC, payload) for _ in range(batch)]
            started = time.perf_counter()
            for _ in range(count // batch):
                journal.append(items)
            out[f"journal writes/s, {batch}/txn"] = round(count / (time.perf_counter() - started))
            if batch == BATCHES[-1]:
                out["bytes on disk/msg"] = round(journal.disk_bytes() / journal.count)
                started = time.perf_counter()
                cursor = deleted = 0
                while rows := journal.read(cursor, 1000):
                    cursor = rows[-1].id
                    for k in range(0, len(rows), 200):
                        deleted += journal.delete(r.id for r in rows[k : k + 200])
                out["journal read+delete/s"] = round(deleted / (time.perf_counter() - started))
            journal.close()
    return out


async def run(ctx: Context) -> list[Row]:
    payload = features_payload()
    n = 20_000 if ctx.quick else 100_000
    runs = [{"figures": await in_process(journal_rates, n, payload)} for _ in range(ctx.repeats)]
    journal = summarise(
        "5 bridge", "journal alone", f"{len(payload)}-byte features messages, FULL sync", runs
    )
    ctx.say(f"  journal: {journal.figures}")
    rows = [journal]
    per_hour = plant_messages_per_hour()
    for batch in (1, 10):
        rows.append(await _backfill(ctx, batch, payload, per_hour))
    return rows


async def _backfill(ctx: Context, batch: int, payload: bytes, per_hour: int) -> Row:
    n = 2_000 if ctx.quick else 20_000
    runs = []
    for r in range(ctx.repeats):
        procs = Procs(ctx.workdir)
        try:
            _, url = procs.broker()
            await wait_broker(url)

            cloud_port = free_port()
            journal = ctx.workdir / f"bridge-{batch}-{r}.sqlite"
            cfg = str(_config(ctx.workdir / f"bridge-{batch}.yaml", journal, cloud_port, batch))
            bridge = procs.uns(
                "bridge",
                *("run", "bridge", "--config", cfg, "--broker", url, "--log-level", "WARNING"),
                metrics=True,
            )
            await wait_metric(
                bridge, lambda s: metric_sum(s, "uns_connected") == 1, what="connected"
            )
            # the outage: no cloud broker yet; the plant's messages go into the journal
            await in_process(load.flood, url, TOPIC, payload, n)
            held = await _settled(bridge, n)
            await asyncio.sleep(1.5)  # the group commits are on disk
            disk = sum(
                p.stat().st_size for p in journal.parent.glob(f"{journal.name}*") if p.is_file()
            )
            cloud, _ = procs.mosquitto("cloud", cloud_port)
            pids = {"bridge": bridge.pid, "cloud": cloud.pid}
            # delivery = the cloud's PUBACK: the bridge's own count, polled (a subscriber at
            # the cloud could only join after the bridge, and miss the first messages)
            times: list[tuple[float, float]] = []
            async with Sampler(pids) as sampler:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    samples = await asyncio.to_thread(bridge.metrics)
                    forwarded = metric_sum(samples, "uns_bridge_forwarded_total")
                    times.append((time.monotonic(), forwarded))
                    if forwarded >= held or (
                        forwarded and time.monotonic() - _last_change(times) > 10
                    ):
                        break
                    await asyncio.sleep(POLL_S)
            rate, started, t_done, bound = _backfill_rate(times, n)
            runs.append(
                {
                    "lost": max(n - int(forwarded), 0),  # into the journal and out of it
                    "figures": {
                        "back-fill msgs/s": round(rate),
                        "journal bytes/msg (WAL incl.)": round(disk / max(held, 1)),
                        "1-h plant backlog drain s": round(per_hour / rate, 1) if rate else 0.0,
                    },
                    "cpu": sampler.cores(started, t_done),
                    "rss": sampler.peak_rss(),
                    "notes": [
                        *([f"{n - held} of {n} never reached the journal"] if held < n else []),
                        *([_SHORT_DRAIN.format(bound, "" if bound == 1 else "s")] if bound else []),
                    ],
                }
            )
        finally:
            procs.stop()
    row = summarise(
        "5 bridge",
        f"back-fill, batch {batch}",
        f"{n:,} journalled messages after an outage -> Mosquitto as the cloud",
        runs,
    )
    row.rate, row.kind = "back-fill msgs/s", "slow"  # a ~1-kB features message, like a slow one
    from uns_bridge import PRESETS, backfill_rate

    default = backfill_rate(None, PRESETS["generic"], batch)
    row.notes.append(
        f"the example plant sends {per_hour:,} messages/hour to the cloud; drained at the"
        f" default backfill_rate of a generic broker ({default:,.0f}/s) in"
        f" {per_hour / default:.0f} s"
    )
    ctx.say(f"  back-fill batch {batch}: {row.figures['back-fill msgs/s']:,.0f} msgs/s")
    return row


async def _settled(bridge: Any, n: int, idle_s: float = 3.0) -> int:
    """Messages in the journal once all ``n`` are there or the count stopped moving."""
    last, since = -1.0, time.monotonic()
    while True:
        held = metric_sum(await asyncio.to_thread(bridge.metrics), "uns_bridge_journal_messages")
        if held >= n:
            return int(held)
        if held != last:
            last, since = held, time.monotonic()
        elif time.monotonic() - since > idle_s:
            return int(held)
        await asyncio.sleep(0.1)


def _backfill_rate(times: list[tuple[float, float]], n: int) -> tuple[float, float, float, int]:
    """Messages/s of the back-fill from the polled forwarded counts ``(time, count)``, the
    interval it covers, and, when the drain was too short for that, how many polls it
    took (the rate is then a lower bound).

    From the first poll that saw deliveries to the first that saw the outage's ``n`` (the
    journal may hold a message more, of the bridge's own, forwarded later: not part of
    the back-fill). When that is under three polls, the first poll saw most of the drain
    and the rest says nothing of its pace: then ``n`` over the time since the last poll
    that saw none."""
    forwarded = times[-1][1]
    want = min(n, forwarded)
    first_i = next((i for i, (_, f) in enumerate(times) if f > 0), len(times) - 1)
    done_i = next((i for i, (_, f) in enumerate(times) if f >= want), len(times) - 1)
    (started, first), (t_done, done) = times[first_i], times[done_i]
    if done_i - first_i >= 3:
        return (done - first) / (t_done - started), started, t_done, 0
    since = times[max(first_i - 1, 0)][0]
    return done / max(t_done - since, POLL_S), since, t_done, done_i - first_i + 1


def _last_change(times: list[tuple[float, float]]) -> float:
    """When the polled count last moved."""
    for (t, f), (_, before) in zip(reversed(times), reversed(times[:-1])):
        if f != before:
            return t
    return times[0][0]


def _config(path: Path, journal: Path, cloud_port: int, batch: int) -> Path:
    document = {
        "namespace": {"enterprise": ENTERPRISE, "site": "pune"},
        "services": {
            "bridge": {
                "queue_size": 100_000,
                "remote": {
                    "url": f"mqtt://127.0.0.1:{cloud_port}",
                    "allow_plaintext": True,
                    "protocol": 4,
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 0.5,
                },
                "journal": {"path": str(journal), "backfill_rate": 1_000_000, "batch": batch},
            }
        },
    }
    path.write_bytes(msgspec.yaml.encode(document))
    return path
