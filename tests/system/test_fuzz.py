"""Hostile payloads over the wire, to every service's input topics, retained and not.

At least 10,000 hypothesis-generated messages per service (`system.fuzz`), published by an
anonymous-looking client (the plant's own credentials: the broker's ACLs are not what is
tested here, the services are). Then: zero crashes (no service restarted, also after a
restart into the retained ones), zero hangs (every service answers a rebirth), every
rejection counted (``uns_messages_dropped_total`` rose by at least the messages that do
not decode), the real plant still scored throughout.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest

from system import fuzz
from system.observer import digest
from system.plant import DEVICES, SCORED, SERVICES, System, wait_for
from uns.payloads import Command, DeviceBirth, DeviceData, DeviceDeath, decode

EXAMPLES = int(os.environ.get("UNS_SYSTEM_FUZZ_EXAMPLES") or 2000)
"""Hypothesis examples; each gives `fuzz.TARGETS` messages (at least 5 per service)."""
RATE = float(os.environ.get("UNS_SYSTEM_FUZZ_RATE") or 1500)
"""Messages per second published (the real plant's traffic flows alongside)."""

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"

KINDS: dict[str, Any] = {
    "raw/birth": DeviceBirth,
    "raw/data": DeviceData,
    "raw/death": DeviceDeath,
    "features/birth": DeviceBirth,
    "features/data": DeviceData,
    "features/death": DeviceDeath,
    "cmd/fault": Command,
    "cmd/clear": Command,
}

pytestmark = pytest.mark.timeout(900)


def receivers(topic: str) -> list[str]:
    """The services subscribed to ``topic`` (see each service's node.subscribe)."""
    if "/_node/" in topic:
        node, message = topic.split("/")[3:5]
        if message == "cmd":
            return [node] if node in SERVICES else []
        return ["bridge"]
    kind = "/".join(topic.split("/")[-2:])
    if kind.startswith("raw/"):
        return ["featurizer"]
    if kind.startswith("features/"):
        return ["inference", "bridge"]
    if kind.startswith("cmd/"):
        return ["simulator"]
    return []


def undecodable(service: str, topic: str, payload: bytes) -> bool:
    """Whether the runtime must drop it as ``decode`` for that service."""
    if not payload:
        return False  # a zero-length message clears a retained one
    if service == "bridge" and "/cmd" not in topic:
        kind: Any = msgspec.Raw
    elif topic.endswith("/cmd"):
        kind = Command
    else:
        kind = KINDS["/".join(topic.split("/")[-2:])]
    try:
        decode(payload, kind)
    except Exception:
        return True
    return False


def total(counts: dict[str, float]) -> float:
    return sum(counts.values())


def scores_gaps(plant: System, start: float, end: float) -> dict[str, float]:
    """Per scored device, the longest wait between two scores in [start, end]."""
    last = dict.fromkeys(SCORED, start)
    worst = dict.fromkeys(SCORED, 0.0)
    for s in plant.watch.snapshot(start, end):
        device = s.topic.rsplit("/", 2)[0]
        if device in last and s.topic.endswith("/scores/data") and s.size:
            worst[device] = max(worst[device], s.t - last[device])
            last[device] = s.t
    return {d: round(max(worst[d], end - last[d]), 1) for d in SCORED}


def answers_rebirth(plant: System, service: str, timeout: float = 90) -> float:
    """Seconds until ``service`` answers a rebirth request with a fresh node birth (asked
    again every 6 s: requests are rate-limited per node)."""
    asked = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.time()
        plant.command(service, "rebirth")
        try:
            plant.watch.until(
                lambda st, sent=sent: (
                    (b := st.last.get(plant.node_topic(service, "birth"))) is not None
                    and b.t >= sent
                    and not b.retain
                ),
                6,
                f"{service}'s rebirth",
            )
            return round(time.time() - asked, 1)
        except AssertionError:
            continue
    raise AssertionError(f"{service} never answered a rebirth within {timeout} s: hung?")


def test_hostile_payloads_crash_nothing_hang_nothing_and_are_counted(
    plant: System, report: Any
) -> None:
    pids = plant.pids()
    before = {s: plant.dropped(s) for s in SERVICES}
    bridge_before = plant.metrics("bridge")
    broker_dropped_before = float(plant.watch.state.sys.get(SYS_DROPPED, 0))
    t0 = time.time()
    fault = plant.fault("fuzz")
    blaster = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("blast.py")), plant.local.url, str(RATE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert blaster.stdin is not None
    frame = msgspec.msgpack.Encoder().encode

    def publish(messages: list[fuzz.Message]) -> None:
        for m in messages:
            data = frame((m.topic, m.payload, 0, m.retain))
            blaster.stdin.write(struct.pack(">I", len(data)) + data)  # type: ignore[union-attr]

    builder = fuzz.Builder(DEVICES, list(SERVICES))
    try:
        batch = fuzz.generate(builder, EXAMPLES, publish)
    finally:
        blaster.stdin.close()
    generated_s = round(time.time() - t0, 1)
    assert blaster.stdout is not None
    out = blaster.stdout.read()  # it ends once everything is published
    blaster.wait(60)
    fault.end = time.time()
    publish_s = round(fault.end - fault.start, 1)
    published = int(out.split()[0]) if blaster.returncode == 0 else out.decode()

    per_service: dict[str, int] = dict.fromkeys(SERVICES, 0)
    expected_drops: dict[str, int] = dict.fromkeys(SERVICES, 0)
    for m in batch.messages:
        for service in receivers(m.topic):
            per_service[service] += 1
            expected_drops[service] += undecodable(service, m.topic, m.payload)
        plant.fuzzed.add((m.topic, digest(m.payload)))
    assert min(per_service.values()) >= 10_000, per_service
    assert published == len(batch.messages), published

    # zero hangs: every service still answers; zero crashes: none restarted
    rebirth_s = {s: answers_rebirth(plant, s) for s in SERVICES}
    after = {s: plant.dropped(s) for s in SERVICES}
    crashed = [s for s in SERVICES if plant.pids().get(s) != pids[s]]
    restarts = plant.restarts(t0)
    lines = log_lines_per_service(plant, fault.start, time.time())
    gaps = scores_gaps(plant, fault.start, time.time())
    bridge_forward = fuzz_forwarded(
        plant, batch, fault.start, bridge_before, before["bridge"], broker_dropped_before
    )
    report.add(
        "fuzz",
        runs=1,
        hypothesis=hypothesis.__version__,
        examples=batch.examples,
        generated_s=generated_s,
        messages=len(batch.messages),
        published=published,
        publish_s=publish_s,
        per_service=per_service,
        expected_decode_drops=expected_drops,
        dropped_delta={
            s: {k: v - before[s].get(k, 0) for k, v in after[s].items() if v != before[s].get(k, 0)}
            for s in SERVICES
        },
        crashed=crashed,
        restarts=restarts,
        tracebacks=plant.tracebacks(t0),
        rebirth_answered_s=rebirth_s,
        log_lines=lines,
        longest_wait_for_a_score_s=gaps,
        retained_topics=len(batch.retained_topics),
        bridge=bridge_forward,
    )
    assert not crashed and not restarts, f"crashed: {crashed}, uns up restarted: {restarts}"
    for s in SERVICES:
        rose = total(after[s]) - total(before[s])
        assert rose >= expected_drops[s], (
            f"{s}: {expected_drops[s]} undecodable messages, dropped_total rose by {rose}"
        )
    assert max(gaps.values()) < 60, f"scoring stalled during the fuzz: {gaps}"
    assert max(lines.values(), default=0) < 2000, f"a service logs per message: {lines}"
    assert (
        bridge_forward["missing"]
        <= bridge_forward["counted_drops"] + bridge_forward["broker_dropped"]
    ), f"the bridge took fuzz messages that never reached the cloud: {bridge_forward}"

    # retained: every service restarted at once meets the retained hostile messages on
    # subscribing (its node command topic; the featurizer, inference and the bridge their
    # births and data): none may go into a crash loop
    restart_into_retained(plant, report, batch)
    clear_retained(plant, batch)
    plant.wait_flowing(time.time(), timeout=180, births_since=plant.started_at)


def restart_into_retained(plant: System, report: Any, batch: fuzz.Batch) -> None:
    fault = plant.fault("every service kill -9 at once, into retained fuzz", bridge_down=True)
    killed = fault.start
    for service in SERVICES:
        plant.kill(service)
    births = plant.wait_online(SERVICES, killed, timeout=180)
    back = fault.end = time.time()
    fault.figures["bridge_back_at"] = killed + births["bridge"]
    # a crash loop shows within seconds of subscribing; hold on for 15 s and look
    time.sleep(15)
    restarts = plant.restarts(back)
    now = plant.pids()
    report.add(
        "fuzz_retained_restart",
        runs=1,
        retained_topics=len(batch.retained_topics),
        back_s=births,
        restarts_after_back=restarts,
        crashed=[s for s in SERVICES if s not in now],
    )
    assert not restarts, f"crash loop on retained hostile messages: {restarts}"


def clear_retained(plant: System, batch: fuzz.Batch) -> None:
    plant.pub.publish_many([(t, b"", 1, True) for t in sorted(batch.retained_topics)])
    wait_for(
        lambda: all(
            plant.watch.state.cleared.get(t, 0) >= plant.watch.state.last[t].t
            for t in batch.retained_topics
            if t in plant.watch.state.last
        ),
        60,
        "the retained fuzz messages cleared",
    )


def log_lines_per_service(plant: System, start: float, end: float) -> dict[str, int]:
    """Log lines of each service between ``start`` and ``end`` (by its logger's package)."""
    assert plant.log is not None
    packages = {
        "uns_bridge": "bridge",
        "uns_featurizer": "featurizer",
        "uns_inference": "inference",
        "uns_modbus_adapter": "modbus-adapter",
        "uns_opcua_adapter": "opcua-adapter",
        "uns_simulator": "simulator",
    }
    counts: dict[str, int] = {}
    with plant.log.cond:
        lines = [line for t, line in plant.log.lines if start <= t <= end]
    for line in lines:
        for prefix, service in packages.items():
            if f" {prefix}." in line or f"uns.runtime: {service}:" in line:
                counts[service] = counts.get(service, 0) + 1
                break
        else:
            counts["other"] = counts.get("other", 0) + 1
    return counts


NOT_FORWARDING = ("decode", "reply_to", "unknown_command", "rebirth_rate", "empty")
"""Drop reasons of the bridge that are not about a message it would forward (undecodable
ones are left out of the count, the rest concern its node commands or empty payloads)."""


def fuzz_forwarded(
    plant: System,
    batch: fuzz.Batch,
    start: float,
    bridge_before: dict[str, float],
    dropped_before: dict[str, float],
    broker_dropped_before: float,
) -> dict[str, Any]:
    """The fuzz messages the bridge could take (valid JSON on its streams) against the
    cloud. One missing there must be a counted drop: the bridge's own
    (``uns_bridge_dropped_total``, or ``uns_messages_dropped_total`` for a reason that
    concerns a forwarded message), or Mosquitto's (its ``$SYS``: the bridge never got it)."""
    messages = {
        (m.topic, digest(m.payload)): m
        for m in batch.messages
        if m.payload and plant.forwarded(m.topic) and not undecodable("bridge", m.topic, m.payload)
    }
    deadline = time.monotonic() + 120
    while True:
        seen_local = {s.key for s in plant.watch.snapshot(start) if s.key in messages}
        at_cloud = {s.key for s in plant.cloud_watch.snapshot(start) if s.key in messages}
        missing = seen_local - at_cloud
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    dropped = plant.dropped("bridge")
    counted = sum(
        v - dropped_before.get(k, 0) for k, v in dropped.items() if k not in NOT_FORWARDING
    )
    after = plant.metrics("bridge")
    journal_drops = after.get("uns_bridge_dropped_total#sum", 0) - bridge_before.get(
        "uns_bridge_dropped_total#sum", 0
    )
    broker = float(plant.watch.state.sys.get(SYS_DROPPED, 0)) - broker_dropped_before
    return {
        "valid_json_on_forwarded_streams": len(messages),
        "seen_locally": len(seen_local),
        "at_cloud": len(at_cloud),
        "missing": len(missing),
        "missing_examples": [
            {
                "topic": messages[k].topic,
                "bytes": len(messages[k].payload),
                "retain": messages[k].retain,
                "op": messages[k].op,
            }
            for k in sorted(missing)[:5]
        ],
        "counted_drops": max(counted, journal_drops),
        "broker_dropped": broker,
    }
