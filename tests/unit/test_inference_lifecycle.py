"""The model lifecycle as `uns record` / `uns model …` / `uns audit verify` run it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from uns import DeviceBirth, DeviceData, DeviceDeath, Metric, MetricDef, Window, connect, encode
from uns.config import BrokerSettings
from uns_inference import CommandError, audit, onnxmodel, record, signing
from uns_inference import cli as cli_commands
from uns_inference.signing import SignatureError

DEV = "acme/pune/stamping/line-3/cell-a/press-01"
T0 = 1_795_334_400_000
WAVE = ["vibration.env_bpfo", "vibration.kurtosis", "vibration.rms"]
SLOW = ["bearing_temp.mean"]


def features(n: int, seed: int, wear: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.zeros(n) if wear is None else wear
    load = rng.normal(size=n)
    return np.column_stack(
        [
            0.002 * np.exp(0.3 * rng.normal(size=n) + 3 * w),
            3 + 0.1 * rng.normal(size=n) + 4 * w,
            0.12 + 0.01 * load + 0.003 * rng.normal(size=n) + 0.3 * w,
            45 + 0.5 * load + 0.2 * rng.normal(size=n) + 10 * w,
        ]
    )


def write_recording(path: Path, x: np.ndarray, *, device: str = DEV, step_ms: int = 1000) -> None:
    """A birth, then per row a waveform features message and a slow-tag one for the same
    window end (two messages a row combines)."""
    birth = DeviceBirth(
        ts=T0,
        node="featurizer",
        device=device,
        bdseq=0,
        seq=0,
        metrics=[MetricDef(name=n, datatype="double") for n in WAVE + SLOW],
    )
    out = [record.encode_line(f"{device}/features/birth", T0, True, encode(birth))]
    for i, row in enumerate(x):
        ts = T0 + i * step_ms
        window = Window(start=ts - step_ms, end=ts, good=10_000, total=10_000)
        parts = [WAVE, SLOW]
        for names in parts:
            metrics = [Metric(name=n, value=float(row[(WAVE + SLOW).index(n)])) for n in names]
            msg = DeviceData(ts=ts, node="featurizer", seq=i % 256, metrics=metrics, window=window)
            out.append(record.encode_line(f"{device}/features/data", ts, False, encode(msg)))
    path.write_bytes(b"".join(out))


@pytest.fixture
def healthy_recording(tmp_path: Path) -> Path:
    path = tmp_path / "healthy.jsonl"
    write_recording(path, features(600, seed=1))
    return path


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return cli_commands.model_keygen(tmp_path / "keys" / "signing")


def trained(recording: Path, out: Path, version: str = "1.0.0") -> Path:
    cli_commands.model_train(
        [recording], "anomaly", out, asset="press", version=version, created="2025-01-01T00:00:00Z"
    )
    return out


def test_a_trained_and_signed_model_verifies(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    assert (key.stat().st_mode & 0o777) == 0o600
    card, notes = cli_commands.model_train(
        [healthy_recording], "anomaly", tmp_path / "m", asset="press", version="1.0.0"
    )
    assert card.name == "press-anomaly" and card.kind == "anomaly"
    assert card.features == sorted(WAVE + SLOW)
    assert card.thresholds is not None and card.thresholds.clear < card.thresholds.raise_
    assert card.training.rows > 500 and card.training.devices == [DEV]
    assert card.training.data_sha256 == signing.sha256_file(healthy_recording)
    assert "PCA" in card.method and card.evaluation["components"] >= 1
    assert notes == []
    cli_commands.model_sign(tmp_path / "m", key)
    assert cli_commands.model_verify(tmp_path / "m", pub) == card
    info = cli_commands.model_info(tmp_path / "m")
    assert "press-anomaly 1.0.0" in info and card.sha256 in info and "MISMATCH" not in info


def test_training_twice_on_the_same_recording_gives_the_same_sha256(
    tmp_path: Path, healthy_recording: Path
) -> None:
    a, _ = cli_commands.model_train([healthy_recording], "anomaly", tmp_path / "a", asset="press")
    b, _ = cli_commands.model_train(
        [healthy_recording], "anomaly", tmp_path / "b", asset="press", version="other"
    )
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()


def test_a_model_with_one_byte_flipped_fails_verification(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    m = trained(healthy_recording, tmp_path / "m")
    cli_commands.model_sign(m, key)
    data = bytearray((m / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (m / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CommandError, match="sha256 mismatch"):
        cli_commands.model_verify(m, pub)
    assert "MISMATCH" in cli_commands.model_info(m)


def test_a_changed_card_or_another_key_fails_verification(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    m = trained(healthy_recording, tmp_path / "m")
    cli_commands.model_sign(m, key)
    card = (m / "card.json").read_text()
    (m / "card.json").write_text(card.replace('"min_raise_s": 10.0', '"min_raise_s": 99.0'))
    with pytest.raises(CommandError, match="bad signature"):
        cli_commands.model_verify(m, pub)
    (m / "card.json").write_text(card)
    assert cli_commands.model_verify(m, pub).version == "1.0.0"
    _, other_pub = cli_commands.model_keygen(tmp_path / "other")
    with pytest.raises(CommandError, match="bad signature"):
        cli_commands.model_verify(m, other_pub)


def test_an_unsigned_model_is_refused_unless_unsigned_models_are_allowed(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    _, pub = keys
    m = trained(healthy_recording, tmp_path / "m")
    key = signing.load_public_key(pub)
    with pytest.raises(SignatureError, match="unsigned"):
        onnxmodel.verify(m, key)
    assert onnxmodel.load(m, None, allow_unsigned=True).card.version == "1.0.0"


def test_keygen_never_overwrites_a_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(CommandError, match="not overwriting"):
        cli_commands.model_keygen(tmp_path / "keys" / "signing")


def test_promote_copies_the_model_flips_current_and_audits_it(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    models, log = tmp_path / "models", tmp_path / "var" / "audit.jsonl"
    v1 = trained(healthy_recording, tmp_path / "v1", "1.0.0")
    v2 = trained(healthy_recording, tmp_path / "v2", "2.0.0")
    for m in (v1, v2):
        cli_commands.model_sign(m, key)
    slot = models / "press" / "anomaly"

    _, dest, previous = cli_commands.model_promote(v1, models, audit_log=log, pubkey=pub)
    assert dest == slot / "1.0.0" and previous is None
    assert (slot / "current").read_text().strip() == "1.0.0"
    assert (dest / "model.onnx.sig").exists() and (dest / "card.json").exists()

    _, _, previous = cli_commands.model_promote(v2, models, audit_log=log)
    assert previous == "1.0.0" and (slot / "current").read_text().strip() == "2.0.0"

    _, _, previous = cli_commands.model_promote(slot / "1.0.0", models, audit_log=log)  # rollback
    assert previous == "2.0.0" and (slot / "current").read_text().strip() == "1.0.0"

    other = tmp_path / "other"
    write_recording(tmp_path / "other.jsonl", features(600, seed=9))
    trained(tmp_path / "other.jsonl", other, "1.0.0")
    with pytest.raises(CommandError, match="immutable"):
        cli_commands.model_promote(other, models, audit_log=log)

    entries = audit.read(log)
    assert [(e["event"], e["version"]) for e in entries] == [
        ("promote", "1.0.0"),
        ("promote", "2.0.0"),
        ("promote", "1.0.0"),
    ]
    assert entries[2]["reason"] == "replaces 2.0.0"
    assert cli_commands.audit_verify(log).lines == 3
    assert not list(slot.glob(".*"))  # no temporary files left


def test_promote_with_a_key_refuses_a_model_that_does_not_verify(
    tmp_path: Path, healthy_recording: Path, keys: tuple[Path, Path]
) -> None:
    _, pub = keys
    m = trained(healthy_recording, tmp_path / "m")
    with pytest.raises(CommandError, match="unsigned"):
        cli_commands.model_promote(
            m, tmp_path / "models", audit_log=tmp_path / "a.jsonl", pubkey=pub
        )
    assert not (tmp_path / "models" / "press" / "anomaly" / "current").exists()


def test_audit_verify_names_the_broken_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for v in ("1", "2", "3"):
        audit.append(log, "load", ts=0, model="m", version=v, sha256="s")
    text = log.read_text().replace('"version":"2"', '"version":"7"')
    log.write_text(text)
    with pytest.raises(CommandError, match="line 2"):
        cli_commands.audit_verify(log)


def test_a_rul_model_trains_from_a_run_to_failure_recording(tmp_path: Path) -> None:
    n = 400  # one row a minute: 400 min of life, wear showing in the last ~100
    remaining = np.arange(n)[::-1].astype(float)
    wear = np.exp(-np.minimum(remaining, 200) / 30.0)
    path = tmp_path / "run.jsonl"
    write_recording(path, features(n, seed=3, wear=wear), step_ms=60_000)
    card, _ = cli_commands.model_train(
        [path], "rul", tmp_path / "rul", asset="press", rul_unit="min", rul_cap=125.0
    )
    assert card.kind == "rul" and card.rul_unit == "min" and card.rul_cap == 125.0
    assert card.outputs == ["rul", "rul_lower", "rul_upper"]
    assert card.thresholds is None and "C-MAPSS" in card.method
    model = onnxmodel.load(tmp_path / "rul", None, allow_unsigned=True)
    late = features(5, seed=4, wear=np.ones(5))
    out = model.run(late.astype(np.float32)[:, [3, 0, 1, 2]])  # card order: sorted names
    assert card.features == [
        "bearing_temp.mean",
        "vibration.env_bpfo",
        "vibration.kurtosis",
        "vibration.rms",
    ]
    assert (out["rul"] < 40).all()


def test_training_on_nothing_usable_says_why(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("")
    with pytest.raises(CommandError, match="no features/data"):
        cli_commands.model_train([path], "anomaly", tmp_path / "m", asset="press")
    with pytest.raises(CommandError, match="no such file"):
        cli_commands.model_train([tmp_path / "nope"], "anomaly", tmp_path / "m", asset="press")


async def test_record_writes_what_the_broker_delivers(memory_url: str, tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    births = {}
    async with connect(memory_url) as bus:
        for i in (1, 2, 3):  # retained, so the recorder gets them when it subscribes
            device = f"acme/pune/stamping/line-3/cell-a/press-0{i}"
            births[device] = DeviceBirth(
                ts=T0, node="featurizer", device=device, bdseq=0, seq=0, metrics=[]
            )
            await bus.publish(f"{device}/features/birth", encode(births[device]), retain=True)
        await bus.publish(f"{DEV}/raw/birth", encode(births[DEV]), retain=True)  # not recorded
    written = await cli_commands.record_messages(
        memory_url,
        BrokerSettings(),
        "+/+/+/+/+/+/features/#",
        out,
        stop=asyncio.Event(),
        count=3,
    )
    assert written == 3
    messages = list(record.read_messages(out))
    assert {m.topic.rsplit("/", 2)[0]: m.payload for m in messages} == births
    assert all(m.ts is not None for m in messages)


async def test_record_stops_after_its_duration(memory_url: str, tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    written = await cli_commands.record_messages(
        memory_url, BrokerSettings(), "#", out, stop=asyncio.Event(), duration=0.2
    )
    assert written == 0 and out.exists()


async def _publish_features(url: str, device: str, n: int, seq0: int = 0) -> None:
    async with connect(url) as bus:
        for i in range(n):
            data = DeviceData(ts=T0 + i, node="featurizer", seq=(seq0 + i) % 256, metrics=[])
            await bus.publish(f"{device}/features/data", encode(data), qos=1)


class Said(list[str]):
    """What the recorder says, and an event once it said anything (it is subscribed)."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribed = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.append(line)
        self.subscribed.set()


async def recording(url: str, out: Path, said: Said, **until: Any) -> asyncio.Task[int]:
    """A recorder of features messages, running, once it said it is subscribed."""
    recorder = asyncio.create_task(
        cli_commands.record_messages(
            url,
            BrokerSettings(),
            "+/+/+/+/+/+/features/#",
            out,
            stop=asyncio.Event(),
            say=said,
            **until,
        )
    )
    await said.subscribed.wait()  # it says when it is subscribed: nothing sent after is lost
    return recorder


async def test_record_until_idle_stops_once_nothing_comes(memory_url: str, tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    said = Said()
    recorder = await recording(memory_url, out, said, until_idle=0.3)
    await _publish_features(memory_url, DEV, 5)
    written = await asyncio.wait_for(recorder, 10)
    assert written == 5
    assert said[0].startswith("subscribed to")
    assert said[-1] == "stopping: nothing came for 0.3 s"


async def test_record_until_replay_end_waits_for_every_replayed_device(
    memory_url: str, tmp_path: Path
) -> None:
    other = DEV.replace("press-01", "press-02")
    out = tmp_path / "rec.jsonl"
    said = Said()
    recorder = await recording(memory_url, out, said, until_replay_end=True, until_idle=0.3)
    await _publish_features(memory_url, DEV, 3)
    await _publish_features(memory_url, other, 3)
    end = DeviceDeath(
        ts=T0,
        node="replay",
        device=DEV,
        bdseq=0,
        seq=3,
        reason="end of replay: 3 rows, 3 seen back",
    )
    async with connect(memory_url) as bus:
        await bus.publish(f"{DEV}/raw/death", encode(end), qos=1, retain=True)
        lost = DeviceDeath(ts=T0, node="replay", device=other, bdseq=0, seq=3, reason="shutdown")
        await bus.publish(f"{other}/raw/death", encode(lost), qos=1)  # not an end of replay
    await asyncio.wait({recorder}, timeout=0.6)  # quiet longer than until_idle: one replay
    assert not recorder.done()  # is not over (a shutdown is not an end of replay)
    await _publish_features(memory_url, other, 2, seq0=3)  # its last windows
    other_end = msgspec.structs.replace(end, device=other, seq=5)
    async with connect(memory_url) as bus:
        await bus.publish(f"{other}/raw/death", encode(other_end), qos=1)
    written = await asyncio.wait_for(recorder, 10)
    assert written == 8  # every features message, none of the deaths
    assert said[-1] == "stopping: every replay ended and nothing came for 0.3 s"
