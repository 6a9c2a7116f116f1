"""Feature records of simulated machines, computed offline with the featurizer's own maths.

The default model of the example plant is trained on these (healthy running,
fixed seeds: the same records every time, so ``make model`` is reproducible),
and the evaluation replays fault ramps through them. Records have the shape of
``uns sub --json`` / ``uns record`` lines: ``{"topic", "retained", "payload"}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from uns import DeviceData, DevicePath, Metric, Window
from uns_featurizer import FeaturizerSettings, waveform_features
from uns_simulator import Machine


def feature_records(
    asset: str,
    *,
    machines: int = 4,
    minutes: int = 120,
    seed: int = 1,
    window_every_s: float = 60.0,
    faults: dict[int, tuple[str, float, float, float]] | None = None,
    settings: FeaturizerSettings | None = None,
    enterprise: str = "acme",
) -> Iterator[dict[str, Any]]:
    """One waveform-features record per machine per ``window_every_s`` simulated seconds.

    ``faults``: machine index -> (kind, severity, ramp_s, start_s) injected at start_s.
    """
    s = settings or FeaturizerSettings()
    n = s.waveform.window
    fleet = [Machine(asset, seed * 1000 + i) for i in range(machines)]
    paths = [
        DevicePath(enterprise, "sim", "eval", "line-1", "cell-a", f"{asset}-{i + 1:02d}")
        for i in range(machines)
    ]
    steps = int(minutes * 60 / window_every_s)
    t0_ms = 1_700_000_000_000
    for step in range(steps):
        now_s = step * window_every_s
        for i, machine in enumerate(fleet):
            fault = (faults or {}).get(i)
            if fault and fault[3] <= now_s and fault[0] not in machine.faults:
                machine.inject(fault[0], severity=fault[1], ramp_s=fault[2])
            machine.step(window_every_s)
            x = machine.vibration(n)
            feats = waveform_features(
                x,
                machine.rate_hz,
                bands=tuple(s.waveform.bands),
                shaft_hz=machine.shaft_hz,
                envelope_band=s.waveform.envelope_band,
            )
            ts = t0_ms + int(now_s * 1000)
            data = DeviceData(
                ts=ts,
                node="simdata",
                seq=step % 256,
                metrics=[
                    Metric(name=f"vibration.{k}", value=round(v, 9)) for k, v in feats.items()
                ],
                window=Window(start=ts, end=ts + int(n / machine.rate_hz * 1000), good=n, total=n),
            )
            yield {
                "topic": paths[i].topic("features", "data"),
                "retained": False,
                "payload": msgspec.to_builtins(data),
                "truth": {k: round(f.level(machine.now_s), 4) for k, f in machine.faults.items()},
            }
