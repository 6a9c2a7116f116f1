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
from uns_featurizer import FeaturizerSettings, SlowWindow, slow_features, waveform_features
from uns_simulator import ASSETS, Machine


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


def slow_feature_records(
    asset: str,
    tags: dict[str, float],
    *,
    machines: int = 4,
    minutes: int = 240,
    seed: int = 1,
    window_s: float = 60.0,
    hop_s: float = 10.0,
    enterprise: str = "acme",
) -> Iterator[dict[str, Any]]:
    """Slow-tag feature records of simulated machines as the live pipeline makes them: each
    tag in ``tags`` (name -> poll period, s) read at its period, sent only when it changed
    (the adapters report by exception), windowed by the featurizer's `SlowWindow` and
    `slow_features`; one record per machine per hop with every tag's statistics of that
    window (the window's end, as one per-device features message carries them)."""
    by_name = {t.name: t.state for t in ASSETS[asset]}
    unknown = sorted(set(tags) - set(by_name))
    if unknown:
        raise ValueError(f"{asset} has no tag {', '.join(unknown)}; known: {', '.join(by_name)}")
    dt_s = min(tags.values())
    every = {name: max(1, round(period / dt_s)) for name, period in tags.items()}
    length_ms, hop_ms = int(window_s * 1000), int(hop_s * 1000)
    t0_ms = 1_700_000_000_000
    for i in range(machines):
        machine = Machine(asset, seed * 1000 + i)
        path = DevicePath(enterprise, "sim", "eval", "line-1", "cell-a", f"{asset}-{i + 1:02d}")
        windows = {name: SlowWindow(length_ms=length_ms, hop_ms=hop_ms) for name in tags}
        last: dict[str, float] = {}
        closed: dict[int, dict[str, float]] = {}
        for step in range(int(minutes * 60 / dt_s)):
            machine.step(dt_s)
            ts = t0_ms + round(machine.now_s * 1000)
            readings = machine.readings()
            for name, n in every.items():
                if step % n:
                    continue
                value = float(readings[by_name[name]][0])
                if last.get(name) == value:
                    continue  # unchanged: not sent
                last[name] = value
                for wts, wvalues, w in windows[name].add(
                    ts, value, good=True, seq=None, node="sim"
                ):
                    if w.start >= t0_ms:  # a window the featurizer had from its start
                        feats = slow_features(wts, wvalues)
                        closed.setdefault(w.end, {}).update(
                            {f"{name}.{k}": round(v, 9) for k, v in feats.items()}
                        )
        for seq, (end, feats) in enumerate(sorted(closed.items())):
            if len(feats) < 5 * len(tags):
                continue  # a tag without a window there (the last hop): not a complete row
            data = DeviceData(
                ts=end,
                node="simdata",
                seq=seq % 256,
                metrics=[Metric(name=k, value=v) for k, v in sorted(feats.items())],
                window=Window(start=end - length_ms, end=end, good=1, total=1),
            )
            yield {
                "topic": path.topic("features", "data"),
                "retained": False,
                "payload": msgspec.to_builtins(data),
                "truth": {},
            }
