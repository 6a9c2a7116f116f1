"""``make eval``: the pipeline's own code on real and simulated machine data, with figures.

Every data set goes through the code the services run: the featurizer's window
maths, ``uns model train`` (recording -> ONNX + card), onnxruntime on the
exported graph, and the inference service's event state machine. The data sets
come from ``UNS_DATASETS`` and are never copied into the repository.

So far: CWRU bearings (real vibration) and the simulator (bearing wear lead time,
healthy false events). NAB and C-MAPSS are still to come (see the README).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from uns import DeviceData, Metric, Window
from uns_inference import cli_commands, onnxmodel
from uns_inference.events import EventState, Hysteresis

CWRU_FS = 12_000.0
CWRU_WINDOW = 2048
CWRU_HOP = 512
CWRU_BANDS = ((10.0, 1000.0), (1000.0, 3000.0), (3000.0, 6000.0))
CWRU_ENVELOPE = (2000.0, 5500.0)


def _decimate(x: np.ndarray, factor: int) -> np.ndarray:
    """Low-pass below the new Nyquist frequency (FFT brick wall), then keep every n-th sample."""
    spectrum = np.fft.rfft(x)
    spectrum[len(spectrum) // factor :] = 0
    return np.fft.irfft(spectrum, len(x))[::factor]


def _windows(x: np.ndarray, n: int, hop: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x) - n + 1, hop):
        yield x[start : start + n]


def _features(x: np.ndarray, rpm: float) -> dict[str, float]:
    from uns_featurizer import waveform_features

    return waveform_features(
        x, CWRU_FS, bands=CWRU_BANDS, shaft_hz=rpm / 60, envelope_band=CWRU_ENVELOPE
    )


def _record(rows: list[dict[str, float]], path: Path, device: str) -> None:
    """Rows as a recording (one features message per window, 1 s apart)."""
    with path.open("wb") as f:
        for i, feats in enumerate(rows):
            ts = 1_700_000_000_000 + i * 1000
            data = DeviceData(
                ts=ts,
                node="eval",
                seq=i % 256,
                window=Window(start=ts - 1000, end=ts, good=CWRU_WINDOW, total=CWRU_WINDOW),
                metrics=[Metric(name=f"vibration.{k}", value=v) for k, v in feats.items()],
            )
            f.write(
                msgspec.json.encode(
                    {"topic": f"{device}/features/data", "retained": False, "payload": data}
                )
                + b"\n"
            )


def _score(
    model: onnxmodel.OnnxModel, names: list[str], rows: list[dict[str, float]]
) -> np.ndarray:
    x = np.array([[r[n.removeprefix("vibration.")] for n in names] for r in rows], dtype=np.float32)
    return np.asarray(model.run(x)["score"], dtype=np.float64)


def cwru(root: Path, work: Path) -> dict[str, Any]:
    """Train on normal windows only; flag rates on held-out normal and every fault file."""
    data = root / "cwru"
    normal = np.load(data / "normal_0_97.npz")
    rpm = float(normal["rpm"])
    x = _decimate(normal["DE"].astype(np.float64), 4)  # recorded at 48 kHz
    rows = [_features(w, rpm) for w in _windows(x, CWRU_WINDOW, CWRU_HOP)]
    cut = int(len(rows) * 0.7)
    train, held_out = rows[:cut], rows[cut + CWRU_WINDOW // CWRU_HOP :]  # no shared samples
    device = "eval/cwru/rig/drive-end/motor/bearing"
    _record(train, work / "cwru-normal.jsonl", device)
    target = work / "cwru-model"
    card, _ = cli_commands.model_train(
        [work / "cwru-normal.jsonl"],
        "anomaly",
        target,
        asset="bearing",
        name="cwru-anomaly",
        version="eval",
        include=("vibration.*",),
        created="eval",
    )
    model = onnxmodel.load(target, None, allow_unsigned=True)
    raise_ = card.thresholds.raise_ if card.thresholds else float("inf")
    out: dict[str, Any] = {
        "train_windows": len(train),
        "features": len(card.features),
        "threshold": raise_,
    }
    out["normal_flagged"] = float((_score(model, card.features, held_out) >= raise_).mean())
    out["normal_windows"] = len(held_out)
    faults = {}
    for f in sorted(data.glob("12k_Drive_End_*.npz")):
        d = np.load(f)
        frows = [
            _features(w, float(d["rpm"]))
            for w in _windows(d["DE"].astype(np.float64), CWRU_WINDOW, CWRU_WINDOW)
        ]
        faults[f.stem.removeprefix("12k_Drive_End_")] = (
            float((_score(model, card.features, frows) >= raise_).mean()),
            len(frows),
        )
    out["faults"] = faults
    return out


def simulator(work: Path) -> dict[str, Any]:
    """Bearing wear ramped over two simulated hours; 24 healthy machine-hours."""
    from uns_featurizer.simdata import feature_records

    current = Path(__file__).resolve().parents[3] / "models" / "press" / "anomaly"
    model = onnxmodel.load(
        current / (current / "current").read_text().strip(), None, allow_unsigned=True
    )
    names = list(model.card.features)
    t = model.card.thresholds
    assert t is not None
    h = Hysteresis.of(t.raise_, t.clear, t.min_raise_s, t.min_clear_s, t.critical)

    def run(records: Iterator[dict[str, Any]]) -> tuple[list[tuple[int, str]], list[Any]]:
        states: dict[str, EventState] = {}
        events: list[tuple[int, str]] = []
        recs = list(records)
        x = np.array(
            [
                [{m["name"]: m["value"] for m in r["payload"]["metrics"]}[n] for n in names]
                for r in recs
            ],
            dtype=np.float32,
        )
        scores = np.asarray(model.run(x)["score"])
        for r, s in zip(recs, scores, strict=True):
            dev = r["topic"]
            tr = states.setdefault(dev, EventState()).update(r["payload"]["ts"], float(s), h)
            if tr is not None:
                events.append((r["payload"]["ts"], f"{dev}:{tr.state}"))
        return events, recs

    healthy_events, _ = run(
        feature_records("press", machines=4, minutes=6 * 60, seed=11, window_every_s=10.0)
    )
    ramp_s, start_s = 7200.0, 600.0
    events, recs = run(
        feature_records(
            "press",
            machines=1,
            minutes=150,
            seed=12,
            window_every_s=10.0,
            faults={0: ("bearing_wear", 1.0, ramp_s, start_s)},
        )
    )
    t0 = recs[0]["payload"]["ts"]
    raised = [ts for ts, what in events if what.endswith(":raised")]
    out: dict[str, Any] = {"healthy_machine_hours": 24, "healthy_events": len(healthy_events)}
    if raised:
        at_s = (raised[0] - t0) / 1000 - start_s
        out["raised_at_severity"] = round(min(1.0, at_s / ramp_s), 3)
        out["lead_time_s"] = round(ramp_s - at_s)
    return out


def main() -> int:
    root = os.environ.get("UNS_DATASETS")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("## Evaluation (make eval)\n")
        sim = simulator(work)
        print("| data | figure | measured | target |")
        print("|---|---|---|---|")
        print(
            f"| simulator | events in {sim['healthy_machine_hours']} healthy machine-hours | "
            f"{sim['healthy_events']} | 0 |"
        )
        if "lead_time_s" in sim:
            print(
                f"| simulator | bearing wear (2 h ramp): raised at severity | "
                f"{sim['raised_at_severity']:.2f} (lead {sim['lead_time_s'] / 60:.0f} min "
                "before full severity) | before failure |"
            )
        else:
            print("| simulator | bearing wear (2 h ramp) | no event | an event |")
        if not root:
            print("\nUNS_DATASETS is not set: the real data sets were skipped.")
            return 0
        c = cwru(Path(root), work)
        print(
            f"| CWRU | held-out normal windows flagged | {c['normal_flagged']:.1%} "
            f"of {c['normal_windows']} | <= 1% |"
        )
        for name, (rate, n) in c["faults"].items():
            print(f"| CWRU | {name} windows flagged | {rate:.1%} of {n} | >= 99% |")
        ok = c["normal_flagged"] <= 0.01 and all(r >= 0.99 for r, _ in c["faults"].values())
        print(
            f"\nCWRU: {'targets met' if ok else 'targets MISSED'}; "
            f"{c['features']} features, trained on {c['train_windows']} normal windows."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
