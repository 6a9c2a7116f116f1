"""The inference service against hostile and unlucky peers: forged deaths and features
from another node, data before a birth, a restart with an anomaly open."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

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
    write_recording,
)

from clitools import Proc, start
from fixtures.brokers import Mosquitto
from fixtures.logs import capturing_logs
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
from uns.testing import running, watching
from uns_inference import Inference, audit, record
from uns_inference import cli as cli_commands

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
        await scores_after(w, feeder, features(2, seed=222))
        assert drops(node, "unannounced") == 4  # 2 windows, 2 messages each; before the scores


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
        await scores_after(w, feeder, features(2, seed=231))
        assert drops(node, "unannounced") == 24  # 12 windows: a waveform and a slow message each
        assert len([m for m in w.seen if m.topic == cmd]) == 1  # once per node per 30 s
        assert events_of(w.seen, dev) == []  # the unannounced fault left nothing behind


# ---- a restart with an anomaly open: a real process, killed, on a real broker -------------


def inference_config(path: Path, prefix: str, dev: str, life: Lifecycle) -> Path:
    config = {
        "namespace": {"enterprise": prefix, "site": "pune"},
        "plant": {"devices": [{"path": dev, "asset": "press"}]},
        "services": {"inference": {**life.settings(), "metrics_port": 0}},
    }
    path.write_bytes(msgspec.json.encode(config))  # JSON is YAML
    return path


async def start_inference(procs: list[Proc], url: str, config: Path) -> Proc:
    proc = start(procs, "run", "inference", "--broker", url, "--config", str(config))
    await asyncio.to_thread(proc.wait_line, "births published")
    return proc


def kill(proc: Proc) -> None:
    proc.p.kill()  # SIGKILL: no clean stop, no last save
    proc.p.wait(timeout=30)


@pytest.mark.mosquitto
async def test_an_event_open_across_kills_goes_on_under_its_id_and_clears_once(
    mosquitto: Mosquitto, prefix: str, life: Lifecycle, procs: list[Proc], tmp_path: Path
) -> None:
    dev = device(prefix)
    config = inference_config(tmp_path / "plant.yaml", prefix, dev, life)
    async with watching(mosquitto.url, f"{prefix}/#") as w, connect(mosquitto.url) as bus:
        first = await start_inference(procs, mosquitto.url, config)
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await feeder.windows(features(5, seed=300))
        await feeder.windows(faulty(features(12, seed=301)))
        raised = msgspec.json.decode(
            (await w.wait_for(on(f"{dev}/events/anomaly", "raised"))).payload, type=Event
        )
        kill(first)  # the fault goes on

        second = await start_inference(procs, mosquitto.url, config)
        assert any(f"anomaly {raised.id} still open" in line for line in second.lines)
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder.i = 20  # data time goes on across the restart
        await scores_after(w, feeder, faulty(features(8, seed=302)))  # 8 s more of the fault
        assert [e.state for e in events_of(w.seen, dev)] == ["raised"]
        kill(second)  # the fault clears while no inference runs

        await start_inference(procs, mosquitto.url, config)
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder.i = 40
        await feeder.windows(features(12, seed=303))  # healthy again: 3 s to clear
        cleared = msgspec.json.decode(
            (await w.wait_for(on(f"{dev}/events/anomaly", "cleared"))).payload, type=Event
        )
        await scores_after(w, feeder, features(2, seed=304))  # everything before it is in
    events = events_of(w.seen, dev)
    assert [(e.state, e.id) for e in events] == [("raised", raised.id), ("cleared", raised.id)]
    assert cleared.started == raised.started
    # data time first: the window end of the score that raised (cleared) it, not when sent
    assert raised.data_ts is not None and cleared.data_ts is not None
    assert raised.started <= raised.data_ts < cleared.data_ts <= T0 + 53_000
    assert raised.ts > T0 + 53_000  # processing time (today), data time is from T0
    assert cleared.count >= 1 and cleared.score is not None and raised.score is not None
    assert cleared.score >= raised.score  # the peak, kept across both restarts


async def test_an_unreadable_state_file_is_an_error_line_and_a_fresh_start(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    dev = device(prefix)
    state = life.root / "var" / "inference-events.json"
    state.write_bytes(b'{"v": 1, "events": [{"id": ')  # cut off by a full disk
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()),
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        error = await logs.wait_for("not a state file")
        assert error.levelno == logging.ERROR
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await feeder.windows(faulty(features(6, seed=310)))
        await w.wait_for(on(f"{dev}/events/anomaly", "raised"))
    assert b'"events":[{' in state.read_bytes()  # replaced by one that holds the open event


# ---- uns record: stopped at once, what it recorded kept -------------------------------------


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def lines_in(path: Path, at_least: int, timeout: float = 60) -> int:
    """Wait until the recording holds ``at_least`` lines (the file is all there is)."""
    async with asyncio.timeout(timeout):
        while True:
            n = await asyncio.to_thread(count_lines, path)
            if n >= at_least:
                return n
            await asyncio.sleep(0.05)


def stopped_within(proc: Proc, sig: int, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    proc.p.send_signal(sig)
    code = proc.p.wait(timeout=timeout)
    return code, time.monotonic() - started


@pytest.mark.mosquitto
async def test_record_stops_at_once_mid_backlog_and_when_idle_and_keeps_a_valid_file(
    mosquitto: Mosquitto, prefix: str, procs: list[Proc], tmp_path: Path
) -> None:
    metrics = [Metric(name="x", value=1.0)]
    body = encode(DeviceData(ts=T0, node="featurizer", seq=0, metrics=metrics))
    async with connect(mosquitto.url) as bus:  # a broker carrying a backlog of retained state
        for i in range(5000):
            await bus.publish(f"{prefix}/pune/a/l/c/d{i}/features/data", body, retain=True)
        for i in range(3):
            await bus.publish(f"{prefix}/pune/b/l/c/d{i}/features/data", body, qos=1, retain=True)
    busy, idle = tmp_path / "busy.jsonl", tmp_path / "idle.jsonl"
    url = mosquitto.url
    recorder = start(procs, "record", f"{prefix}/pune/a/#", "--out", str(busy), "--broker", url)
    await lines_in(busy, 100)  # working through the backlog
    code, took_busy = await asyncio.to_thread(stopped_within, recorder, signal.SIGINT, 30)
    assert code == 0
    recorded = busy.read_bytes().splitlines()
    assert len(list(record.read_messages(busy))) == len(recorded)  # every line whole
    await asyncio.to_thread(recorder.wait_line, f"{len(recorded)} messages written")

    recorder = start(procs, "record", f"{prefix}/pune/b/#", "--out", str(idle), "--broker", url)
    await lines_in(idle, 3)  # all there is: now it waits for more
    code, took_idle = await asyncio.to_thread(stopped_within, recorder, signal.SIGTERM, 30)
    assert code == 0
    assert len(list(record.read_messages(idle))) == 3
    print(f"recorded {len(recorded)} of 5000, then stopped {took_busy:.2f} s after SIGINT;")
    print(f"idle, stopped {took_idle:.2f} s after SIGTERM")
    assert max(took_busy, took_idle) < 10  # the requirement is 2 s; generous for CI


# ---- models refused, the previous one serving ------------------------------------------------


async def refused_while_v1_serves(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records, directory: Path
) -> tuple[str, Any]:
    """Promote ``directory`` while v1 scores a device; the refusal line and the node."""
    dev = device(prefix)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await scores_after(w, feeder, features(2, seed=400))
        life.promote(directory)
        refused = await logs.wait_for("refused")
        assert refused.levelno == logging.ERROR
        assert "1.0.0 keeps serving" in refused.getMessage()
        scores = await scores_after(w, feeder, features(2, seed=401))
        assert scores.model is not None and scores.model.sha256 == life.v1.sha256
    entries = audit.read(life.audit)
    assert [e["event"] for e in entries][-2:] == ["promote", "refuse"]
    assert audit.verify(life.audit) is None
    return refused.getMessage(), node


def refusals(node: Any, reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "uns_inference_models_refused_total", {"service": "inference", "reason": reason}
    )
    return value or 0.0


async def test_a_model_signed_with_another_key_is_refused_and_the_previous_one_serves(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    v2, _ = life.train("2.0.0", seed=2, sign=False)
    other, _ = cli_commands.model_keygen(life.root / "keys" / "someone-else")
    cli_commands.model_sign(v2, other)
    message, node = await refused_while_v1_serves(memory_url, prefix, life, logs, v2)
    assert "bad signature" in message and refusals(node, "signature") == 1


async def test_a_model_whose_graph_does_not_take_its_cards_features_is_refused(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    data = life.root / "healthy-wave.jsonl"
    write_recording(data, features(600, seed=5))
    v2 = life.root / "build" / "2.0.0"
    cli_commands.model_train(
        [data], "anomaly", v2, asset="press", version="2.0.0", include=["vibration.*"]
    )
    card = json.loads((v2 / "card.json").read_text())  # a card naming a fourth input
    card["features"].append("bearing_temp.mean")
    for name, extra in (("means", 45.0), ("stds", 1.0), ("log", False), ("offsets", 0.0)):
        card["normalisation"][name].append(extra)
    (v2 / "card.json").write_text(json.dumps(card))
    cli_commands.model_sign(v2, life.key)  # signed as it is: the graph check still refuses
    message, node = await refused_while_v1_serves(memory_url, prefix, life, logs, v2)
    assert "features[N, 4]" in message and refusals(node, "graph") == 1


async def test_a_model_for_features_the_devices_do_not_announce_is_refused(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    data = life.root / "healthy-crest.jsonl"
    write_recording(data, features(600, seed=6))
    text = data.read_text().replace("vibration.kurtosis", "vibration.crest_factor")
    data.write_text(text)  # trained where the featurizer publishes another feature
    v2 = life.root / "build" / "2.0.0"
    cli_commands.model_train([data], "anomaly", v2, asset="press", version="2.0.0")
    cli_commands.model_sign(v2, life.key)
    message, node = await refused_while_v1_serves(memory_url, prefix, life, logs, v2)
    assert "vibration.crest_factor" in message and refusals(node, "features") == 1
