"""`uns eval` on what the pipeline really publishes: a labelled CSV replayed (``uns replay``,
its label column not published) through Mosquitto, the featurizer and the inference with a
model trained on a healthy replay, recorded (``uns record``'s code, to the replay's end),
then evaluated by ``uns eval`` against the CSV's own label column."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from uns.config import BrokerSettings
from uns.testing import running
from uns_featurizer import Featurizer
from uns_inference import Inference, model_promote, model_train, record_messages

pytestmark = pytest.mark.integration

T0_S = 1_704_067_200  # 2024-01-01T00:00:00Z: a historian export's own time
SLOW = {"window_s": 10.0, "hop_s": 10.0, "stagger": False}
FAULT = range(400, 460)
"""Rows of the labelled file where the temperature runs 8 degrees hot (labelled 1)."""


def export(path: Path, rows: int, seed: int, *, labelled: bool = False) -> Path:
    """One row a second: a temperature around 50 degC and a flow; a label column."""
    rng = np.random.default_rng(seed)
    temp = 50 + 0.3 * rng.normal(size=rows)
    flow = 3 + 0.1 * rng.normal(size=rows)
    label = np.zeros(rows, dtype=int)
    if labelled:
        temp[FAULT.start : FAULT.stop] += 8
        label[FAULT.start : FAULT.stop] = 1
    lines = [
        f"{T0_S + i},{t:.3f},{f:.3f},{n}" for i, (t, f, n) in enumerate(zip(temp, flow, label))
    ]
    path.write_text("ts,temp,flow,label\n" + "\n".join(lines) + "\n")
    return path


async def uns(*args: str | Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uns", *map(str, args)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def replay_and_record(url: str, csv: Path, device: str, out: Path) -> None:
    """``uns replay`` of ``csv`` as ``device``, everything of the device recorded to the
    replay's end (and the scores of its last windows after it)."""
    subscribed = asyncio.Event()

    def say(line: str) -> None:
        if line.startswith("subscribed"):
            subscribed.set()

    recorder = asyncio.create_task(
        record_messages(
            url,
            BrokerSettings(),
            f"{device}/#",
            out,
            stop=asyncio.Event(),
            until_replay_end=True,
            until_idle=2.0,
            say=say,
        )
    )
    await asyncio.wait_for(subscribed.wait(), 30)
    code, _, err = await uns(
        "replay", csv, "--device", device, "--speed", "0", "--broker", url, "--ignore", "label"
    )
    assert code == 0, err
    await asyncio.wait_for(recorder, 60)


class Loaded(logging.Handler):
    """Set once the inference serves a model (its log line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.serving = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if ": serving " in record.getMessage():
            self.serving.set()


@pytest.fixture
def loaded() -> Iterator[Loaded]:
    handler = Loaded()
    logger = logging.getLogger("uns_inference")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_a_labelled_replay_through_the_pipeline_is_evaluated_against_its_label_column(
    mosquitto, prefix, tmp_path, loaded
):
    healthy_dev = f"{prefix}/pune/utilities/line-1/cell-a/pump-01"
    dev = f"{prefix}/pune/utilities/line-1/cell-a/pump-02"
    plant = [(healthy_dev, "pump"), (dev, "pump")]
    url = mosquitto.url

    # train on a healthy replay of the same machine type, as a user would
    features = tmp_path / "healthy.jsonl"
    async with running(Featurizer, url, prefix, plant=plant, slow=SLOW):
        await replay_and_record(
            url, export(tmp_path / "healthy.csv", 900, 1), healthy_dev, features
        )
    card, _ = model_train(
        [features],
        "anomaly",
        tmp_path / "build",
        asset="pump",
        version="1",
        min_raise_s=20,
        min_clear_s=20,
    )
    models = tmp_path / "models"
    model_promote(tmp_path / "build", models, audit_log=tmp_path / "audit.jsonl")

    labelled = export(tmp_path / "labelled.csv", 600, 2, labelled=True)
    recording = tmp_path / "scored.jsonl"
    settings = {
        "models_dir": str(models),
        "allow_unsigned": True,
        "audit_log": str(tmp_path / "audit.jsonl"),
        "state_file": str(tmp_path / "events.json"),
        "reload_s": 0.2,
    }
    async with (
        running(Featurizer, url, prefix, plant=plant, slow=SLOW),
        running(Inference, url, prefix, plant=plant, **settings),
    ):
        await asyncio.wait_for(loaded.serving.wait(), 30)
        await replay_and_record(url, labelled, dev, recording)

    figures = tmp_path / "figures.json"
    code, out, err = await uns(
        "eval", recording, "--labels", labelled, "--label-column", "label", "--json", figures
    )
    assert code == 0, err
    report = json.loads(figures.read_text())
    point, event = report["point"], report["event"]
    # one point per complete 10 s window of the 600 s replayed (its last one never closes),
    # however many times the inference scored it
    assert point["points"] == 59
    assert point["labelled"] == 6  # the windows holding rows 400-459
    assert point["recall"] == 1.0
    assert point["false_alarm_rate"] <= 0.05
    assert event["source"] == "events"  # the inference's own raised events
    assert (event["labelled_windows"], event["caught"], event["false_events"]) == (1, 1, 0)
    # data time: the first hot window ends at 410 s, the event is raised 20 s later
    # (min_raise_s) at the end of the window ending 430 s: 30 s after the fault began
    assert event["median_delay_s"] == 30.0
    assert report["windows"][0]["start"] == "2024-01-01T00:06:40Z"
    assert "labelled windows caught 1 of 1" in out
    assert "label" not in {m.rsplit(".", 1)[0] for m in card.features}  # never published
