"""One score per complete window: a CSV replayed through the featurizer and the inference,
as a user runs them (`uns replay`, a model trained on what the featurizer published, signed
and promoted), its windows checked one by one."""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from uns import DeviceData, decode
from uns.testing import running, watching
from uns_featurizer import Featurizer
from uns_inference import Inference, onnxmodel, record, signing
from uns_inference import cli as cli_commands

pytestmark = pytest.mark.integration

SLOW = {"window_s": 10, "hop_s": 10, "stagger": False}
DAY_MS = 86_400_000
T_TRAIN = 1_704_067_200_000  # 2024-01-01T00:00:00Z
T_TEST = T_TRAIN + DAY_MS


def csv_file(path: Path, rows: int, seed: int, *, gap: range = range(0)) -> Path:
    """Three tags at 1 Hz from ``path``'s day; ``flow`` has no value in the ``gap`` rows."""
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(scale=0.05, size=rows))
    day = 1 if "healthy" in path.name else 2
    lines = ["time,temp,pressure,flow"]
    for i in range(rows):
        temp = 40 + 2 * load[i] + rng.normal(scale=0.2)
        pressure = 4 + 0.1 * load[i] + rng.normal(scale=0.02)
        flow = "" if i in gap else f"{12 + load[i] + rng.normal(scale=0.1):.4f}"
        lines.append(
            f"2024-01-{day:02d}T00:{i // 60:02d}:{i % 60:02d}Z,{temp:.4f},{pressure:.4f},{flow}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


async def uns_replay(f: Path, device: str, url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uns", "replay", str(f), "--device", device),
        *("--speed", "0", "--broker", url, "--time-column", "time"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()


def is_features_of(device: str, end: int):  # type: ignore[no-untyped-def]
    def match(m) -> bool:  # type: ignore[no-untyped-def]
        if m.topic != f"{device}/features/data" or not m.payload:
            return False
        data = decode(m.payload)
        return data.window is not None and data.window.end == end

    return match


async def test_a_replay_is_scored_once_per_complete_window_from_that_windows_features(
    mosquitto, prefix: str, tmp_path: Path
) -> None:
    dev = f"{prefix}/pune/mixing/line-1/cell-a/mixer-01"
    url = mosquitto.url

    # 1. what a user does: replay a healthy stretch through the featurizer, record, train
    healthy = csv_file(tmp_path / "healthy.csv", 600, seed=1)
    async with (
        running(Featurizer, url, prefix, plant=[(dev, "mixer")], slow=SLOW),
        watching(url, f"{dev}/features/#") as w,
    ):
        await uns_replay(healthy, dev, url)
        await w.wait_for(is_features_of(dev, T_TRAIN + 590_000))  # the last window closed
    rec = tmp_path / "healthy.jsonl"
    rec.write_bytes(
        b"".join(
            record.encode_line(m.topic, T_TRAIN, m.retain, m.payload)
            for m in w.messages
            if m.payload
        )
    )
    train_messages = [m for m in w.messages if m.topic.endswith("/features/data")]
    assert len(train_messages) == 59  # one per device per window (ends 10 s .. 590 s)
    out = tmp_path / "build" / "mixer"
    card, _ = cli_commands.model_train(
        [rec], "anomaly", out, asset="mixer", version="1.0.0", include=("*.mean", "*.std")
    )
    assert card.training.rows == 59  # one row per window
    assert card.features == [
        f"{t}.{s}" for t in ("flow", "pressure", "temp") for s in ("mean", "std")
    ]
    key, pub = cli_commands.model_keygen(tmp_path / "keys" / "signing")
    cli_commands.model_sign(out, key)
    models, audit = tmp_path / "models", tmp_path / "var" / "audit.jsonl"
    cli_commands.model_promote(out, models, audit_log=audit)
    model = onnxmodel.load(out, signing.load_public_key(pub))

    # 2. a day later, 5 minutes in which flow has no value from 100 s to 120 s
    test = csv_file(tmp_path / "test.csv", 300, seed=2, gap=range(100, 120))
    settings = {"models_dir": str(models), "pubkey": str(pub), "audit_log": str(audit)}
    async with (
        running(Inference, url, prefix, plant=[(dev, "mixer")], reload_s=0.2, **settings),
        watching(url, f"{dev}/#") as w,
    ):
        await w.wait_for(lambda m: m.topic == f"{dev}/scores/birth")
        async with running(Featurizer, url, prefix, plant=[(dev, "mixer")], slow=SLOW):
            await uns_replay(test, dev, url)
            last = await w.wait_for(is_features_of(dev, T_TEST + 290_000))
            assert last is not None
            await w.wait_for(
                lambda m: (
                    m.topic == f"{dev}/scores/data"
                    and decode(m.payload).data_ts == T_TEST + 290_000
                )
            )

    # the windows, one by one: every feature of a window end, from however many messages
    windows: dict[int, dict[str, float]] = defaultdict(dict)
    parts: dict[int, list[DeviceData]] = defaultdict(list)
    for m in w.messages:
        if m.topic == f"{dev}/features/data":
            data = decode(m.payload)
            assert data.data_ts == data.window.end and set(data.signals) <= {
                "temp",
                "pressure",
                "flow",
            }
            windows[data.window.end].update({x.name: x.value for x in data.metrics})
            parts[data.window.end].append(data)
    scores = [decode(m.payload) for m in w.messages if m.topic == f"{dev}/scores/data"]
    complete = sorted(e for e, f in windows.items() if set(card.features) <= set(f))
    assert [s.data_ts for s in scores] == complete  # each complete window once, in order
    assert T_TEST + 110_000 not in complete and T_TEST + 120_000 not in complete  # no flow
    assert T_TEST + 130_000 in complete and len(complete) == len(windows) - 2
    for s in scores:
        end = s.data_ts
        assert s.window is not None and s.window.end == end
        assert s.window.start == parts[end][0].window.start
        assert s.window.good == sum(p.window.good for p in parts[end])
        x = np.array([[windows[end][f] for f in card.features]], dtype=np.float32)
        expected = float(model.run(x)["score"][0])  # from that window's features, no other
        got = {m.name: m.value for m in s.metrics}["anomaly_score"]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
