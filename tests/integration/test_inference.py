"""The inference service on a broker: scores, one event per fault, signed models hot-loaded."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from uns import Bus, DeviceBirth, DeviceData, Event, Metric, MetricDef, Window, connect, encode
from uns.testing import Watcher, running, watching
from uns_inference import Inference, audit, record
from uns_inference import cli as cli_commands
from uns_inference.card import Card

pytestmark = pytest.mark.integration

T0 = 1_795_334_400_000
WAVE = ["vibration.env_bpfo", "vibration.kurtosis", "vibration.rms"]
SLOW = ["bearing_temp.mean"]
ALL = WAVE + SLOW  # the column order of `features`


def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = rng.normal(size=n)
    return np.column_stack(
        [
            0.002 * np.exp(0.3 * rng.normal(size=n)),
            3 + 0.1 * rng.normal(size=n),
            0.12 + 0.01 * load + 0.003 * rng.normal(size=n),
            45 + 0.5 * load + 0.2 * rng.normal(size=n),
        ]
    )


def faulty(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, 0] *= 8  # envelope at BPFO
    y[:, 1] += 3  # kurtosis: impacts
    return y


def window(ts: int) -> Window:
    return Window(start=ts - 1000, end=ts, good=10_000, total=10_000, node="opcua-adapter")


class Featurizer:
    """Publishes features as a featurizer could: a birth, then per 1 s window a slow-tag
    features message and a waveform one for the same window end (a row combines both)."""

    def __init__(self, bus: Bus, device: str) -> None:
        self.bus, self.device, self.i, self.seq = bus, device, 0, 0

    async def birth(self, names: list[str] = ALL) -> None:
        birth = DeviceBirth(
            ts=T0,
            node="featurizer",
            device=self.device,
            bdseq=0,
            seq=0,
            metrics=[MetricDef(name=n, datatype="double", unit="1") for n in names],
        )
        await self.bus.publish(f"{self.device}/features/birth", encode(birth), qos=1, retain=True)

    async def windows(self, rows: np.ndarray, skip: tuple[str, ...] = ()) -> Window:
        """Publish one window per row; return the last waveform message's window."""
        last = window(T0)
        for row in rows:
            ts = T0 + self.i * 1000
            parts = [SLOW, WAVE]
            for names in parts:
                metrics = [
                    Metric(name=n, value=float(row[ALL.index(n)])) for n in names if n not in skip
                ]
                self.seq = (self.seq + 1) % 256
                last = window(ts)
                msg = DeviceData(
                    ts=ts, node="featurizer", seq=self.seq, metrics=metrics, window=last
                )
                await self.bus.publish(f"{self.device}/features/data", encode(msg), qos=1)
            self.i += 1
        return last


class Records(logging.Handler):
    """The service's log lines, awaitable in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.read = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def wait_for(self, text: str, timeout: float = 10.0) -> logging.LogRecord:
        """The next line (after those returned before) that contains ``text``."""
        async with asyncio.timeout(timeout):
            while True:
                while self.read < len(self.records):
                    r = self.records[self.read]
                    self.read += 1
                    if text in r.getMessage():
                        return r
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("uns_inference")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@dataclass
class Lifecycle:
    root: Path
    models: Path
    key: Path
    pub: Path
    audit: Path
    v1: Card

    def train(self, version: str, seed: int, *, sign: bool = True) -> tuple[Path, Card]:
        data = self.root / f"healthy-{seed}.jsonl"
        write_recording(data, features(600, seed))
        out = self.root / "build" / version
        card, _ = cli_commands.model_train(
            [data], "anomaly", out, asset="press", version=version, min_raise_s=3, min_clear_s=3
        )
        if sign:
            cli_commands.model_sign(out, self.key)
        return out, card

    def promote(self, directory: Path) -> None:
        cli_commands.model_promote(directory, self.models, audit_log=self.audit)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "models_dir": str(self.models),
            "pubkey": str(self.pub),
            "audit_log": str(self.audit),
            "reload_s": 0.2,
            **overrides,
        }


def write_recording(path: Path, x: np.ndarray) -> None:
    device = "acme/pune/stamping/line-3/cell-a/press-09"
    lines = []
    for i, row in enumerate(x):
        ts = T0 + i * 1000
        for names in [SLOW, WAVE]:
            metrics = [Metric(name=n, value=float(row[ALL.index(n)])) for n in names]
            msg = DeviceData(ts=ts, node="featurizer", seq=0, metrics=metrics, window=window(ts))
            lines.append(record.encode_line(f"{device}/features/data", ts, False, encode(msg)))
    path.write_bytes(b"".join(lines))


@pytest.fixture
def life(tmp_path: Path) -> Lifecycle:
    key, pub = cli_commands.model_keygen(tmp_path / "keys" / "signing")
    lc = Lifecycle(tmp_path, tmp_path / "models", key, pub, tmp_path / "var" / "audit.jsonl", None)  # type: ignore[arg-type]
    directory, lc.v1 = lc.train("1.0.0", seed=1)
    lc.promote(directory)
    return lc


def device(prefix: str, name: str = "press-01") -> str:
    return f"{prefix}/pune/stamping/line-3/cell-a/{name}"


def on(suffix: str, state: str | None = None) -> Callable[[Any], bool]:
    def match(m: Any) -> bool:
        if not (m.topic.endswith(suffix) and m.payload):
            return False
        return state is None or msgspec.json.decode(m.payload).get("state") == state

    return match


async def scores_after(w: Watcher, feeder: Featurizer, rows: np.ndarray) -> DeviceData:
    """Publish windows; return the scores of the last one."""
    last = await feeder.windows(rows)
    m = await w.wait_for(
        lambda m: (
            m.topic.endswith("/scores/data")
            and msgspec.json.decode(m.payload, type=DeviceData).window == last
        )
    )
    return msgspec.json.decode(m.payload, type=DeviceData)


async def test_scores_carry_the_window_and_the_model_that_made_them(
    memory_url: str, prefix: str, life: Lifecycle
) -> None:
    dev = device(prefix)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        birth = msgspec.json.decode(
            (await w.wait_for(on(f"{dev}/scores/birth"))).payload, type=DeviceBirth
        )
        names = [m.name for m in birth.metrics]
        assert names[:2] == ["anomaly_score", "anomaly_threshold"]
        assert sorted(names[2:]) == sorted(f"contribution.{f}" for f in ALL)
        assert "press-anomaly@1.0.0" in birth.metrics[0].source
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        scores = await scores_after(w, feeder, features(3, seed=50))
        assert scores.model is not None
        assert (scores.model.name, scores.model.version) == ("press-anomaly", "1.0.0")
        assert scores.model.sha256 == life.v1.sha256
        values = {m.name: m.value for m in scores.metrics}
        assert life.v1.thresholds is not None
        assert values["anomaly_threshold"] == life.v1.thresholds.raise_
        assert 0 <= values["anomaly_score"] < values["anomaly_threshold"]
        contributions = [v for k, v in values.items() if k.startswith("contribution.")]
        assert len(contributions) == len(ALL)
        assert sum(contributions) == pytest.approx(values["anomaly_score"], rel=1e-4, abs=1e-5)
        registry = node.metrics.registry
        assert registry.get_sample_value(
            "uns_inference_scores_total", {"service": "inference", "kind": "anomaly"}
        )
        assert registry.get_sample_value(
            "uns_inference_model_info",
            {"service": "inference", "asset": "press", "name": "press-anomaly", "version": "1.0.0"},
        )
        assert registry.get_sample_value(
            "uns_inference_latency_seconds_count", {"service": "inference"}
        )


async def test_a_fault_raises_exactly_one_event_and_recovery_clears_it(
    memory_url: str, prefix: str, life: Lifecycle
) -> None:
    dev = device(prefix)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()),
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await feeder.windows(features(5, seed=60))
        fault_starts = T0 + feeder.i * 1000
        await feeder.windows(faulty(features(12, seed=61)))  # 12 s of fault, 3 s to raise
        await feeder.windows(features(12, seed=62))  # 12 s healthy, 3 s to clear
        cleared_msg = await w.wait_for(on(f"{dev}/events/anomaly", "cleared"))
        await scores_after(w, feeder, features(2, seed=63))  # everything before it is in
        events = [
            msgspec.json.decode(m.payload, type=Event)
            for m in w.seen
            if m.topic == f"{dev}/events/anomaly" and m.payload
        ]
        assert [e.state for e in events] == ["raised", "cleared"]
        raised, cleared = events
        assert raised.id == cleared.id and raised.device == dev == cleared.device
        assert raised.kind == "anomaly" and raised.started == cleared.started == fault_starts
        assert raised.score is not None and raised.threshold is not None
        assert raised.score >= raised.threshold
        assert cleared.score is not None and cleared.score >= raised.score  # the peak
        assert cleared.count >= 1
        assert raised.details["model"] == "press-anomaly"
        assert raised.details["model_version"] == "1.0.0"
        top = str(raised.details["top_features"]).split(",")
        assert len(top) == 3 and {"vibration.env_bpfo", "vibration.kurtosis"} & set(top)
        assert "press-01" in raised.summary
        assert cleared_msg.qos == 1


async def test_a_tampered_model_is_refused_and_the_previous_one_keeps_scoring(
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
        await scores_after(w, feeder, features(2, seed=70))

        # a card edited after signing (a raised threshold would hide alarms): promote lets
        # it through without --pubkey, the service does not
        v2, _ = life.train("2.0.0", seed=2)
        card = (v2 / "card.json").read_text()
        (v2 / "card.json").write_text(card.replace('"min_raise_s": 3.0', '"min_raise_s": 3000.0'))
        life.promote(v2)
        refused = await logs.wait_for("refused")
        assert refused.levelno == logging.ERROR and "bad signature" in refused.getMessage()
        assert "1.0.0 keeps serving" in refused.getMessage()

        # one byte flipped in a model copied into place by hand
        v3, _ = life.train("3.0.0", seed=3)
        data = bytearray((v3 / "model.onnx").read_bytes())
        data[len(data) // 3] ^= 0x01
        (v3 / "model.onnx").write_bytes(bytes(data))
        slot = life.models / "press" / "anomaly"
        shutil.copytree(v3, slot / "3.0.0")
        (slot / "current").write_text("3.0.0\n")
        refused = await logs.wait_for("refused")
        assert "sha256 mismatch" in refused.getMessage()

        scores = await scores_after(w, feeder, features(2, seed=71))
        assert scores.model is not None and scores.model.sha256 == life.v1.sha256
        registry = node.metrics.registry
        for reason in ("signature", "integrity"):
            assert registry.get_sample_value(
                "uns_inference_models_refused_total", {"service": "inference", "reason": reason}
            )
    entries = audit.read(life.audit)
    assert [(e["event"], e["version"]) for e in entries] == [
        ("promote", "1.0.0"),
        ("load", "1.0.0"),
        ("promote", "2.0.0"),
        ("refuse", "2.0.0"),
        ("refuse", "3.0.0"),
    ]
    assert "sha256 mismatch" in entries[-1]["reason"]
    assert audit.verify(life.audit) is None


async def test_a_signed_new_model_is_hot_loaded_without_a_restart(
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
        before = await scores_after(w, feeder, features(2, seed=80))
        assert before.model is not None and before.model.version == "1.0.0"
        v2, card = life.train("2.0.0", seed=2)
        life.promote(v2)
        await w.wait_for(
            lambda m: on(f"{dev}/scores/birth")(m) and b"press-anomaly@2.0.0" in m.payload
        )
        after = await scores_after(w, feeder, features(2, seed=81))
        assert after.model is not None
        assert (after.model.version, after.model.sha256) == ("2.0.0", card.sha256)
        assert card.sha256 != life.v1.sha256
        info = {"service": "inference", "asset": "press", "name": "press-anomaly"}
        registry = node.metrics.registry
        assert registry.get_sample_value("uns_inference_model_info", {**info, "version": "2.0.0"})
        assert not registry.get_sample_value(
            "uns_inference_model_info", {**info, "version": "1.0.0"}
        )
    assert [e["event"] for e in audit.read(life.audit)][-2:] == ["promote", "load"]


async def test_an_unsigned_model_is_refused_unless_unsigned_models_are_allowed(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    dev = device(prefix)
    unsigned, card = life.train("2.0.0", seed=3, sign=False)
    life.promote(unsigned)
    async with running(Inference, memory_url, prefix, plant=[(dev, "press")], **life.settings()):
        refused = await logs.wait_for("refused")
        assert "unsigned" in refused.getMessage()
        assert "no model serves it" in refused.getMessage()
    assert audit.read(life.audit)[-1]["event"] == "refuse"
    settings = life.settings(pubkey=None, allow_unsigned=True)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **settings),
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(
            lambda m: on(f"{dev}/scores/birth")(m) and b"press-anomaly@2.0.0" in m.payload
        )
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        scores = await scores_after(w, feeder, features(2, seed=90))
        assert scores.model is not None and scores.model.sha256 == card.sha256
        await logs.wait_for("allow_unsigned is set")


async def test_features_a_model_needs_but_the_device_never_announces_are_a_clear_error(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    short, full = device(prefix, "press-01"), device(prefix, "press-02")
    plant = [(short, "press"), (full, "press")]
    settings = life.settings(announce_grace_s=0)
    async with (
        running(Inference, memory_url, prefix, plant=plant, **settings) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{full}/scores/birth"))
        lacking = Featurizer(bus, short)
        await lacking.birth([n for n in ALL if n != "vibration.env_bpfo"])
        error = await logs.wait_for("does not announce")
        assert error.levelno == logging.ERROR
        assert short in error.getMessage() and "vibration.env_bpfo" in error.getMessage()
        await lacking.windows(features(3, seed=100), skip=("vibration.env_bpfo",))
        await lacking.windows(features(3, seed=101))  # even data with it: the birth rules
        healthy = Featurizer(bus, full)
        await healthy.birth()
        await scores_after(w, healthy, features(3, seed=102))  # the service is fine
        assert not [m for m in w.seen if m.topic == f"{short}/scores/data"]
        assert node.metrics.registry.get_sample_value(
            "uns_inference_rows_skipped_total", {"service": "inference", "reason": "missing"}
        )


async def test_each_window_is_scored_once_from_its_own_features_and_an_incomplete_one_never(
    memory_url: str, prefix: str, life: Lifecycle, logs: Records
) -> None:
    """Windows checked one by one: two features messages per window make one score, with
    that window and its data time; windows lacking bearing_temp are not scored from an
    older window's value, and are given up once the data is max_feature_age_s past them."""
    dev = device(prefix)
    settings = life.settings(max_feature_age_s=5)
    async with (
        running(Inference, memory_url, prefix, plant=[(dev, "press")], **settings) as node,
        watching(memory_url, f"{prefix}/#") as w,
        connect(memory_url) as bus,
    ):
        await w.wait_for(on(f"{dev}/scores/birth"))
        feeder = Featurizer(bus, dev)
        await feeder.birth()
        await scores_after(w, feeder, features(5, seed=110))  # t=0..4, complete
        await feeder.windows(features(3, seed=111), skip=tuple(SLOW))  # t=5..7: no bearing_temp
        await scores_after(w, feeder, features(7, seed=112))  # t=8..14, complete
        gave_up = await logs.wait_for("the windows that lack some of its features")
        assert "bearing_temp.mean" in gave_up.getMessage()
        await logs.wait_for("scoring with press-anomaly again")
        scores = [
            msgspec.json.decode(m.payload, type=DeviceData)
            for m in w.seen
            if m.topic == f"{dev}/scores/data"
        ]
        ends = [s.window.end for s in scores if s.window is not None]
        assert ends == [T0 + i * 1000 for i in (*range(5), *range(8, 15))]  # each once, in order
        assert all(s.data_ts == s.window.end for s in scores if s.window is not None)
        assert all(s.ts >= s.data_ts for s in scores if s.data_ts is not None)  # ts: made now
        assert (
            node.metrics.registry.get_sample_value(
                "uns_inference_rows_skipped_total", {"service": "inference", "reason": "incomplete"}
            )
            == 3
        )
