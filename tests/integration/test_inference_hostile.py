"""The inference service against hostile and unlucky peers: forged deaths and features
from another node, data before a birth, a restart with an anomaly open."""

from __future__ import annotations

import logging

import msgspec
import pytest
from test_inference import (
    ALL,
    T0,
    Featurizer,
    Lifecycle,
    Records,
    device,
    faulty,
    features,
    life,
    logs,
    on,
    scores_after,
    window,
)

from harness import capturing_logs, running, watching
from uns import (
    Command,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Event,
    Metric,
    MetricDef,
    connect,
    encode,
)
from uns_inference import Inference

pytestmark = pytest.mark.integration
__all__ = ["life", "logs"]  # fixtures, imported for use here

FORGED_FAULT = {
    "vibration.env_bpfo": 0.5,
    "vibration.kurtosis": 40.0,
    "vibration.rms": 5.0,
    "bearing_temp.mean": 95.0,
}


def drops(node: object, reason: str) -> float:
    value = node.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "uns_messages_dropped_total", {"service": "inference", "reason": reason}
    )
    return value or 0.0


def events_of(seen: list[object], dev: str) -> list[Event]:
    return [
        msgspec.json.decode(m.payload, type=Event)  # type: ignore[attr-defined]
        for m in seen
        if m.topic == f"{dev}/events/anomaly" and m.payload  # type: ignore[attr-defined]
    ]


async def test_a_death_forged_by_another_node_does_not_stop_scoring_and_a_real_fault_raises(
    memory_url: str, prefix: str, life: Lifecycle
) -> None:
    dev = device(prefix)
    with capturing_logs("uns") as records:
        async with (
            running(
                Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()
            ) as node,
            watching(memory_url, f"{prefix}/#") as w,
            connect(memory_url) as bus,
        ):
            await w.wait_for(on(f"{dev}/scores/birth"))
            feeder = Featurizer(bus, dev)
            await feeder.birth()
            await scores_after(w, feeder, features(5, seed=200))
            for forger in ("intruder", "featurizer-2"):
                death = DeviceDeath(ts=T0, node=forger, device=dev, bdseq=0, seq=0, reason="forged")
                await bus.publish(f"{dev}/features/death", encode(death), qos=1, retain=True)
            await feeder.windows(faulty(features(12, seed=201)))  # 12 s of fault, 3 to raise
            raised = await w.wait_for(on(f"{dev}/events/anomaly", "raised"))
            assert msgspec.json.decode(raised.payload, type=Event).device == dev
            assert drops(node, "foreign_node") == 2
        assert not [m for m in w.seen if m.topic == f"{dev}/scores/death" and m.payload]
        lines = [r.getMessage() for r in records.of("uns")]
        assert any("foreign_node" in line and "intruder" in line for line in lines)
        assert not any("not scoring it" in line for line in lines)


async def test_features_forged_by_another_node_raise_nothing(
    memory_url: str, prefix: str, life: Lifecycle
) -> None:
    dev = device(prefix)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await scores_after(w, feeder, features(3, seed=210))
        for i in range(30):  # 30 s of a forged fault from a node that never announced it
            ts = T0 + (feeder.i + i) * 1000
            metrics = [Metric(name=n, value=v) for n, v in FORGED_FAULT.items()]
            forged = DeviceData(ts=ts, node="intruder", seq=i, metrics=metrics, window=window(ts))
            await bus.publish(f"{dev}/features/data", encode(forged), qos=1)
        last = await scores_after(w, feeder, features(3, seed=211))  # the real node, healthy
        values = {m.name: m.value for m in last.metrics}
        assert values["anomaly_score"] < values["anomaly_threshold"]  # nothing mixed in
        assert events_of(w.seen, dev) == []
        assert drops(node, "foreign_node") == 30
        # a birth of its own then makes that node the device's announcer (Sparkplug: the
        # newest birth wins), loudly
        forged_birth = DeviceBirth(
            ts=T0,
            node="intruder",
            device=dev,
            bdseq=7,
            seq=0,
            metrics=[MetricDef(name=n, datatype="double") for n in ALL],
        )
        with capturing_logs("uns_inference") as records:
            await bus.publish(f"{dev}/features/birth", encode(forged_birth), qos=1, retain=True)
            await records.wait(
                lambda: any(
                    "now announced by node intruder" in r.getMessage()
                    for r in records.of("uns_inference")
                )
            )


async def test_the_announcing_nodes_death_stops_scoring_with_a_warning(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    dev = device(prefix)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await scores_after(w, feeder, features(3, seed=220))
        death = DeviceDeath(
            ts=T0, node="featurizer", device=dev, bdseq=0, seq=0, reason="source device died"
        )
        await bus.publish(f"{dev}/features/death", encode(death), qos=1, retain=True)
        stopped = await logs.wait_for("not scoring it")
        assert stopped.levelno == logging.WARNING
        assert dev in stopped.getMessage() and "source device died" in stopped.getMessage()
        assert (await w.wait_topic(f"{dev}/scores/death")).reason == "features stream died"
        await feeder.windows(features(2, seed=221))  # from the right node, but after its death
        await feeder.birth()
        await logs.wait_for("scoring resumes")
        feeder.i = 10  # the death forgot every value: from the next slow-tag window on
        await scores_after(w, feeder, features(2, seed=222))
        assert drops(node, "unannounced") == 2  # counted in order, before the scores above


async def test_data_before_a_birth_is_dropped_and_the_node_asked_for_a_rebirth(
    memory_url: str, prefix: str, life: Lifecycle
) -> None:
    dev = device(prefix)
    cmd = f"{prefix}/pune/_node/featurizer/cmd"
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.windows(faulty(features(12, seed=230)))  # never announced
        asked = await w.wait_for(lambda m: m.topic == cmd)
        assert msgspec.json.decode(asked.payload, type=Command).name == "rebirth"
        await feeder.birth()  # what the rebirth brings
        feeder.i = 20  # nothing before the birth was kept: from a slow-tag window on
        await scores_after(w, feeder, features(2, seed=231))
        assert drops(node, "unannounced") == 14  # 12 windows: 12 waveform + 2 slow messages
        assert len([m for m in w.seen if m.topic == cmd]) == 1  # once per node per 30 s
        assert events_of(w.seen, dev) == []  # the unannounced fault left nothing behind
