"""Windowing: raw samples in, complete windows out, with what was excluded and why.

Pure and synchronous. A waveform window is a run of back-to-back blocks (a
missing, repeated or out-of-order block breaks the run: the samples before it
are dropped and counted, so no window ever spans a hole). A slow-tag window is a
time span of good, finite, strictly increasing samples; everything else is
counted by reason.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from uns import Waveform, Window


@dataclass
class Excluded:
    """Samples kept out of the features, by reason."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += n


@dataclass
class WaveformWindow:
    """Per device and signal: blocks in, windows of ``length`` samples every ``hop``."""

    length: int
    hop: int
    excluded: Excluded = field(default_factory=Excluded)
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _t0_us: int = 0
    _rate: float = 0.0
    _next_us: float | None = None
    _seqs: collections.deque[tuple[int, int, int]] = field(default_factory=collections.deque)
    """(sample offset in the buffer, length, source seq) of each buffered block."""

    def add(
        self, block: Waveform, *, seq: int | None, node: str, good: bool = True
    ) -> list[tuple[np.ndarray, float, Window]]:
        """Take one block; return the windows it completes (samples, rate, provenance)."""
        samples = np.frombuffer(
            block.samples, dtype={"f32": "<f4", "f64": "<f8", "i16": "<i2"}[block.dtype]
        )
        samples = samples.astype(np.float32) * np.float32(block.scale)
        if not good:
            self.excluded.add("bad_quality", len(samples))
            self._reset("bad_quality")
            return []
        period_us = 1e6 / block.rate_hz
        if self._next_us is not None and block.rate_hz == self._rate:
            drift = block.t0_us - self._next_us
            if drift < -period_us / 2:  # a repeat or an older block
                self.excluded.add(
                    "duplicate"
                    if abs(drift + len(samples) * period_us) < period_us
                    else "out_of_order",
                    len(samples),
                )
                return []
            if drift > period_us / 2:  # a hole: never let a window span it
                self._reset("gap")
        elif self._next_us is not None:
            self._reset("rate_change")
        if len(self._buffer) == 0:
            self._t0_us = block.t0_us
            self._rate = block.rate_hz
        finite = np.isfinite(samples)
        if not finite.all():
            self.excluded.add("nan", int((~finite).sum()))
        self._seqs.append((len(self._buffer), len(samples), -1 if seq is None else seq))
        self._buffer = np.concatenate([self._buffer, samples])
        self._next_us = block.t0_us + len(samples) * period_us
        out = []
        while len(self._buffer) >= self.length:
            window = self._buffer[: self.length]
            start_us = self._t0_us
            seqs = [s for off, _, s in self._seqs if off < self.length]
            bad = int((~np.isfinite(window)).sum())
            out.append(
                (
                    window.copy(),
                    self._rate,
                    Window(
                        start=int(start_us // 1000),
                        end=int((start_us + self.length * period_us) // 1000),
                        good=self.length - bad,
                        total=self.length,
                        seq_first=seqs[0] if seqs and seqs[0] >= 0 else None,
                        seq_last=seqs[-1] if seqs and seqs[-1] >= 0 else None,
                        node=node,
                    ),
                )
            )
            self._advance(self.hop, period_us)
        return out

    def _advance(self, n: int, period_us: float) -> None:
        self._buffer = self._buffer[n:]
        self._t0_us += round(n * period_us)
        self._seqs = collections.deque(
            (off - n, length, s) for off, length, s in self._seqs if off - n + length > 0
        )

    def _reset(self, reason: str) -> None:
        self.excluded.add(reason, len(self._buffer))
        self._buffer = np.zeros(0, dtype=np.float32)
        self._seqs.clear()
        self._next_us = None


@dataclass
class SlowWindow:
    """Per device and tag: (ts, value) samples in, a window of ``length_ms`` every ``hop_ms``,
    aligned to event time (the data's own timestamps, so replays at any speed agree): the
    windows end at ``phase_ms`` past multiples of ``hop_ms``."""

    length_ms: int
    hop_ms: int
    phase_ms: int = 0
    excluded: Excluded = field(default_factory=Excluded)
    _ts: collections.deque[int] = field(default_factory=collections.deque)
    _values: collections.deque[float] = field(default_factory=collections.deque)
    _seqs: collections.deque[int] = field(default_factory=collections.deque)
    _last_ts: int | None = None
    _next_end: int | None = None
    _total: int = 0

    def add(
        self, ts: int, value: float | None, *, good: bool, seq: int | None, node: str
    ) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        """Take one sample; return the windows that closed before it."""
        out = []
        if self._next_end is None:
            hops = (ts - self.phase_ms) // self.hop_ms + 1
            self._next_end = hops * self.hop_ms + self.phase_ms
        while ts >= self._next_end:  # windows ending before this sample are complete
            out.extend(self._close(self._next_end, node))
            self._next_end += self.hop_ms
        self._total += 1
        if not good:
            self.excluded.add("bad_quality")
        elif value is None or not np.isfinite(value):
            self.excluded.add("nan")
        elif self._last_ts is not None and ts == self._last_ts:
            self.excluded.add("duplicate")
        elif self._last_ts is not None and ts < self._last_ts:
            self.excluded.add("out_of_order")
        else:
            self._ts.append(ts)
            self._values.append(float(value))
            self._seqs.append(-1 if seq is None else seq)
            self._last_ts = ts
        return out

    def _close(self, end: int, node: str) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        start = end - self.length_ms
        while self._ts and self._ts[0] < start:
            self._ts.popleft()
            self._values.popleft()
            self._seqs.popleft()
        total, self._total = self._total, 0
        if not self._ts:
            return []
        ts = np.fromiter(self._ts, dtype=np.int64)
        inside = ts < end
        if not inside.any():
            return []
        values = np.fromiter(self._values, dtype=np.float64)[inside]
        seqs = [s for s, i in zip(self._seqs, inside) if i]
        return [
            (
                ts[inside],
                values,
                Window(
                    start=start,
                    end=end,
                    good=int(inside.sum()),
                    total=max(total, int(inside.sum())),
                    seq_first=seqs[0] if seqs[0] >= 0 else None,
                    seq_last=seqs[-1] if seqs[-1] >= 0 else None,
                    node=node,
                ),
            )
        ]
