"""Load: a slow consumer on everything, and a burst of raw data at 10x the plant's rate.

The burst comes from `blast.py --raw` (its own process): an edge node ``load`` with enough
devices, each sending 10 waveform blocks of 1,000 samples per second, to make ten times the
raw messages per second the plant itself publishes (measured first). The slow consumer is
a bare MQTT client (a socket, QoS 1, never acknowledging) that reads 1 kB twice a second.

During the burst every service's and the broker's RSS is sampled from /proc and the
featurizer's queues from /metrics; afterwards the features of the plant's own devices
must flow again. The counts the suite reports: what the publisher sent, what a watcher
received, what the featurizer received, dropped (by reason) and turned into windows; what
is in none of them is loss no metric counts.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from system.plant import DEVICES, RUNNING, System, rss_mb, wait_for

pytestmark = pytest.mark.timeout(600)

BURST_S = float(os.environ.get("UNS_SYSTEM_BURST_S") or 30)
BURST_LONG_S = float(os.environ.get("UNS_SYSTEM_BURST_LONG_S") or 120)
FACTOR = 10
LOAD_PREFIX = "acme/pune/load/line-1/cell-1"


class SlowConsumer(threading.Thread):
    """A subscriber that reads slowly: MQTT 3.1.1 by hand over a socket, QoS 1, no PUBACK
    ever sent, no keep-alive (the broker must not drop it for that), 1 kB per 0.5 s."""

    def __init__(self, port: int, user: str, password: str, topic_filter: str) -> None:
        super().__init__(daemon=True, name="slow-consumer")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            _packet(
                0x10,
                _string("MQTT")
                + bytes([4, 0xC2, 0, 0])  # level 4; username, password, clean; keep-alive 0
                + _string("system-slow-consumer")
                + _string(user)
                + _string(password),
            )
        )
        connack = self.sock.recv(4)
        assert connack[:1] == b"\x20" and connack[3:4] == b"\x00", connack
        self.sock.sendall(_packet(0x82, b"\x00\x01" + _string(topic_filter) + b"\x01"))
        self.read = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.read += len(self.sock.recv(1024))
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


LOAD_MSG_BYTES = 5_500
"""About the size of one of the burst's messages (a 1,000-sample float32 block)."""


def raw_rate(plant: System, seconds: float = 10) -> tuple[float, float]:
    """Raw data messages and bytes per second the plant itself publishes (the last
    ``seconds``)."""
    now = time.time()
    seen = [s for s in plant.watch.snapshot(now - seconds, now) if s.topic.endswith("/raw/data")]
    return len(seen) / seconds, sum(s.size for s in seen) / seconds


def burst(plant: System, report: Any, case: str, seconds: float) -> None:
    normal, normal_bytes = raw_rate(plant)
    # ten times the plant's raw bytes per second, in blocks of 10 per second per device
    devices = max(1, math.ceil(FACTOR * normal_bytes / LOAD_MSG_BYTES / 10))
    pids = plant.pids()
    watched = {**pids, "local-broker": plant.local.proc.pid}  # type: ignore[union-attr]
    baseline = {name: rss_mb(pid) or 0.0 for name, pid in watched.items()}
    before = plant.metrics("featurizer")
    before_at = time.time()
    dropped_before = plant.dropped("featurizer")
    sys_dropped = "$SYS/broker/publish/messages/dropped"
    broker_dropped_before = float(plant.watch.state.sys.get(sys_dropped, 0))
    slow = SlowConsumer(plant.local.port, plant.local.user, plant.local.password, "acme/#")
    slow.start()
    start = time.time()
    blaster = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("blast.py")),
            plant.local.url,
            "--raw",
            LOAD_PREFIX,
            str(devices),
            "10",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = dict(baseline)
    depth_peak = 0.0
    try:
        while blaster.poll() is None:
            for name, pid in watched.items():
                peak[name] = max(peak[name], rss_mb(pid) or 0.0)
            try:
                m = plant.metrics("featurizer", timeout=3)
                depth_peak = max(
                    depth_peak,
                    *(v for k, v in m.items() if k.startswith("uns_queue_depth_messages{")),
                )
            except OSError:
                pass
            time.sleep(1)
        out = blaster.stdout.read() if blaster.stdout else ""  # it has ended
        end = time.time()
        # recovery: the plant's own devices have features again, the queue is drained
        plant.watch.until(
            lambda st: all(
                (s := st.last.get(f"{d}/features/data")) is not None and s.t > end for d in DEVICES
            ),
            180,
            "features from every plant device after the burst",
        )
        recovered_s = round(time.time() - end, 1)
        drained_s = drain(plant, end)
    finally:
        if blaster.poll() is None:
            blaster.kill()
        slow.close()
    after_at = time.time()
    after = plant.metrics("featurizer")
    dropped_after = plant.dropped("featurizer")
    sent = int(out.split()[0]) if blaster.returncode == 0 else 0
    seen = plant.watch.snapshot(start - 1)
    load_data = [
        s for s in seen if s.topic.startswith(LOAD_PREFIX) and s.topic.endswith("/raw/data")
    ]
    raw_all = [s for s in plant.watch.snapshot(before_at, after_at) if "/raw/" in s.topic]
    load_features = [
        s for s in seen if s.topic.startswith(LOAD_PREFIX) and s.topic.endswith("/features/data")
    ]
    received_raw = after.get(
        'uns_messages_received_total{service="featurizer",stream="raw"}', 0
    ) - (before.get('uns_messages_received_total{service="featurizer",stream="raw"}', 0))
    drops = {
        k: v - dropped_before.get(k, 0)
        for k, v in dropped_after.items()
        if v != dropped_before.get(k, 0)
    }
    windows_expected = sent // 10  # a 10,000-sample window is ten blocks
    report.add(
        case,
        runs=1,
        seconds=seconds,
        plant_raw_msgs_per_s=round(normal, 1),
        plant_raw_kbytes_per_s=round(normal_bytes / 1000, 1),
        load_devices=devices,
        load_msgs_per_s=round(sent / seconds, 1),
        load_kbytes_per_s=round(sent * LOAD_MSG_BYTES / seconds / 1000, 1),
        excluded=excluded(before, after),
        published=sent,
        watcher_received=len(load_data),
        featurizer_received_raw=received_raw,
        watcher_raw_all=len(raw_all),
        featurizer_dropped=drops,
        load_windows_expected=windows_expected,
        load_features_seen=len(load_features),
        featurizer_queue_depth_peak=depth_peak,
        rss_baseline_mb={k: round(v, 1) for k, v in baseline.items()},
        rss_peak_mb={k: round(v, 1) for k, v in peak.items()},
        slow_consumer_read_bytes=slow.read,
        # Mosquitto's own count (its $SYS, every 2 s): what it dropped for the slow consumer
        broker_dropped=float(plant.watch.state.sys.get(sys_dropped, 0)) - broker_dropped_before,
        recovered_s=recovered_s,
        queue_drained_s=drained_s,
        load_windows_short_by_device=short_by_device(load_features, devices, sent // devices),
        unaccounted_publisher_to_watcher=sent - len(load_data),
        unaccounted_broker_to_featurizer=len(raw_all) - received_raw,
    )
    clear_load(plant, devices)
    assert blaster.returncode == 0 and sent > 0, out
    assert depth_peak <= 10_000, "a queue grew past its bound"
    for name in watched:
        bound = max(2.5 * baseline[name], baseline[name] + 400)
        assert peak[name] <= bound, (
            f"{name}: RSS {peak[name]:.0f} MB (baseline {baseline[name]:.0f})"
        )
    assert set(plant.pids()) == set(RUNNING)


def drain(plant: System, since: float) -> float:
    """Seconds after ``since`` until the featurizer's inbound queue is about empty (the
    gauge is set on every receipt; the plant's own data keeps arriving) and no features
    of the burst's devices arrived for 3 s: the backlog is worked off."""

    def quiet() -> bool:
        depth = sum(
            v
            for k, v in plant.metrics("featurizer").items()
            if k.startswith("uns_queue_depth_messages{") and 'queue="inbound"' in k
        )
        last = [
            s.t
            for s in plant.watch.snapshot(time.time() - 3)
            if s.topic.startswith(LOAD_PREFIX) and s.topic.endswith("/features/data")
        ]
        return depth <= 50 and not last

    wait_for(quiet, 120, "the featurizer's backlog worked off", every=1.0)
    return round(time.time() - since, 1)


def short_by_device(features: list[Any], devices: int, blocks: int) -> dict[str, int]:
    """Per burst device, windows missing against the ten-blocks-a-window arithmetic."""
    counts: dict[str, int] = {}
    for s in features:
        device = s.topic.rsplit("/", 2)[0]
        counts[device] = counts.get(device, 0) + 1
    expected = blocks // 10
    short = {
        f"dev-{i:02d}": expected - counts.get(f"{LOAD_PREFIX}/dev-{i:02d}", 0)
        for i in range(devices)
    }
    return {d: n for d, n in short.items() if n}


def excluded(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The featurizer's samples left out during the burst, by reason."""
    out = {}
    for key, value in after.items():
        if key.startswith("uns_featurizer_samples_excluded_total{") and value != before.get(key):
            reason = key.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in key else key
            out[reason] = value - before.get(key, 0)
    return out


def clear_load(plant: System, devices: int) -> None:
    topics = [f"{LOAD_PREFIX}/dev-{i:02d}/raw/birth" for i in range(devices)]
    topics.append(plant.node_topic("load", "birth"))
    plant.pub.publish_many([(t, b"", 1, True) for t in topics])


def test_a_slow_consumer_and_a_10x_burst_stay_bounded_and_recover(
    plant: System, report: Any
) -> None:
    burst(plant, report, "load_burst", BURST_S)


@pytest.mark.system_long
def test_a_slow_consumer_and_a_10x_burst_for_minutes(plant: System, report: Any) -> None:
    burst(plant, report, "load_burst_long", BURST_LONG_S)
