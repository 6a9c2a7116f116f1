"""A publisher in its own process, so neither its flood nor what generates it slows the
test's watchers. paho directly; the last message is followed by a QoS 1 marker whose
PUBACK says everything before it was taken (TCP keeps order). Prints what it sent.

``python blast.py URL RATE``: stdin gives frames of a 4-byte big-endian length and a
msgpack ``[topic, payload, qos, retain]``, published at most RATE per second.

``python blast.py URL --raw PREFIX DEVICES BLOCKS_PER_S SECONDS``: an edge node ``load``
with DEVICES devices ``PREFIX/dev-NN``, each sending BLOCKS_PER_S waveform blocks of 1,000
samples at 10 kHz per second (QoS 0, timestamps of now, the node's seq counting every
message) for SECONDS: raw data at a chosen rate, as an adapter would publish it.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt


def connect(url: Any) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"blast-{uuid.uuid4().hex[:8]}"
    )
    client.max_queued_messages_set(0)
    if url.username:
        client.username_pw_set(url.username, url.password)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=60)
    client.loop_start()
    if not connected.wait(30):
        raise SystemExit("blast: no connection")
    return client


def frames(url: Any, rate: float) -> int:
    client = connect(url)
    decoder = msgspec.msgpack.Decoder()
    stdin = sys.stdin.buffer
    sent = refused = 0
    started = time.monotonic()
    while header := stdin.read(4):
        (size,) = struct.unpack(">I", header)
        topic, payload, qos, retain = decoder.decode(stdin.read(size))
        try:
            client.publish(topic, payload, qos=qos, retain=retain)
            sent += 1
        except ValueError:  # paho refuses it before it leaves
            refused += 1
        if rate and sent % 50 == 0:
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    marker = client.publish("blast/done", b"", qos=1)
    marker.wait_for_publish(120)
    print(f"{sent} {refused} {time.monotonic() - started:.1f}")
    client.loop_stop()
    client.disconnect()
    return 0


def raw(url: Any, prefix: str, devices: int, per_s: float, seconds: float) -> int:
    client = connect(url)
    enterprise, site = prefix.split("/")[:2]
    paths = [f"{prefix}/dev-{i:02d}" for i in range(devices)]
    samples = base64.b64encode(b"\x00\x00\x00\x3f" * 1000).decode()  # 0.5 g, float32
    seq, sent = 0, 0
    now = time.time_ns() // 1_000_000
    birth = {"type": "nbirth", "v": 1, "ts": now, "node": "load", "service": "load", "bdseq": 0}
    client.publish(f"{enterprise}/{site}/_node/load/birth", json.dumps(birth), qos=1, retain=True)
    for path in paths:
        seq = (seq + 1) % 256
        dbirth = {
            "type": "dbirth",
            "v": 1,
            "ts": now,
            "node": "load",
            "device": path,
            "bdseq": 0,
            "seq": seq,
            "metrics": [
                {"name": "vibration", "datatype": "waveform", "unit": "g", "rate_hz": 10000.0},
            ],
        }
        client.publish(f"{path}/raw/birth", json.dumps(dbirth), qos=1, retain=True)
    period = 1.0 / per_s
    started = time.monotonic()
    t0_us = time.time_ns() // 1000
    block = 0
    while time.monotonic() - started < seconds:
        t_us = t0_us + block * 100_000  # a sensor's clock: block after block, no hole
        for path in paths:
            seq = (seq + 1) % 256
            data = (
                f'{{"type":"ddata","v":1,"ts":{t_us // 1000},"node":"load","seq":{seq},'
                f'"metrics":[{{"name":"vibration","value":{{"t0_us":{t_us},"rate_hz":10000.0,'
                f'"samples":"{samples}","block":{block}}}}}]}}'
            )
            client.publish(f"{path}/raw/data", data, qos=0)
            sent += 1
        block += 1
        ahead = started + block * period - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    marker = client.publish("blast/done", b"", qos=1)
    marker.wait_for_publish(120)
    print(f"{sent} 0 {time.monotonic() - started:.1f}")
    client.loop_stop()
    client.disconnect()
    return 0


def main() -> int:
    url = urlsplit(sys.argv[1])
    if sys.argv[2] == "--raw":
        prefix, devices, per_s, seconds = sys.argv[3:7]
        return raw(url, prefix, int(devices), float(per_s), float(seconds))
    return frames(url, float(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
