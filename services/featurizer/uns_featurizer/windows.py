"""Windowing: raw samples in, complete windows out, with what was excluded and why.

Pure and synchronous. A waveform window is a run of back-to-back blocks (a
missing, repeated or out-of-order block breaks the run: the samples before it
are dropped and counted, so no window ever spans a hole). A slow-tag window is a
time span of good, finite, strictly increasing samples; everything else is
counted by reason.

Nothing a message carries is trusted to be sane: a block whose bytes are not whole
samples, whose rate is zero or absurd, or a timestamp years away is refused and
counted, never an exception, and no loop runs over a gap in time (a sample an hour
after the last one closes the windows that hold data and jumps to the one holding
it). With `TimeBounds` (the service always gives them) a timestamp must also be
near the box's clock, and a jump far beyond what the clock moved is held until
``resync_after`` samples agree on the new time, so one forged or garbled stamp can
neither move a tag's windows away nor stop them.
"""

from __future__ import annotations

import array
import collections
import math
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import numpy as np

from uns import Waveform, Window

EPOCH_FLOOR_MS: Final = 946_684_800_000
"""2000-01-01T00:00:00Z: nothing a plant records is older (0, negative or garbage stamps)."""
SAMPLE_BYTES: Final = {"f32": 4, "f64": 8, "i16": 2}
_NUMPY_DTYPES: Final = {"f32": "<f4", "f64": "<f8", "i16": "<i2"}
LOGGED: Final = frozenset({"timestamp", "rate", "samples", "scale", "type", "range", "overflow"})
"""Reasons that mean a sender (or a forger) is wrong, not the process: worth a log line."""

T = TypeVar("T")


@dataclass
class Excluded:
    """Samples kept out of the features, by reason, and what the last of each was."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    details: dict[str, str] = field(default_factory=dict)
    """For reasons in `LOGGED`: why, in words, for the service's log line."""

    def add(self, reason: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` samples under ``reason``; ``detail`` says why, for the log."""
        if n:
            self.counts[reason] += n
            if detail:
                self.details[reason] = detail


def short(value: object, limit: int = 64) -> str:
    """A value from a message for a log line: never its whole size (a 1 MB node name, an
    integer of 4,000 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _span(ms: float) -> str:
    """A duration for a log line: 3.2 s, 4.0 min, 31.0 years."""
    if abs(ms) >= 10**20:
        return "aeons"  # 3 billion years and more: float division would overflow
    s = abs(ms) / 1000
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


@dataclass(frozen=True)
class TimeBounds:
    """What a sample's timestamp may be: near the box's clock, and near its own stream."""

    max_future_ms: int = 300_000
    max_past_ms: int | None = None
    """None: anything since `EPOCH_FLOOR_MS` (a replay of an old recording is fine)."""
    max_jump_ms: int = 3_600_000
    resync_after: int = 3

    def refuse(self, ts_ms: int, now_ms: int) -> str | None:
        """Why ``ts_ms`` is refused outright (words for the log), or None."""
        if ts_ms > now_ms + self.max_future_ms:
            return (
                f"{_span(ts_ms - now_ms)} ahead of this box's clock"
                f" (max_future_s {self.max_future_ms / 1000:g}; check the sender's clock)"
            )
        if ts_ms < EPOCH_FLOOR_MS:
            return "before the year 2000"
        if self.max_past_ms is not None and ts_ms < now_ms - self.max_past_ms:
            return (
                f"{_span(now_ms - ts_ms)} behind this box's clock"
                f" (max_past_s {self.max_past_ms / 1000:g})"
            )
        return None

    def jumps(self, ref_ms: int, ref_wall_ms: int, ts_ms: int, now_ms: int) -> bool:
        """Whether a stream last at ``ref_ms`` (seen at wall time ``ref_wall_ms``) jumps to
        ``ts_ms``: back by more than ``max_jump_ms``, or ahead by more than that beyond
        what the box's clock moved meanwhile (a machine silent over a weekend is not a
        jump; a replay at speed moves a little faster than the clock, well within)."""
        moved = ts_ms - ref_ms
        return moved < -self.max_jump_ms or moved - max(0, now_ms - ref_wall_ms) > self.max_jump_ms


@dataclass
class _Clock(Generic[T]):
    """Where one stream is in event time, and samples held after a jump until confirmed."""

    last_ms: int | None = None
    last_wall_ms: int = 0
    held: list[tuple[int, int, T]] = field(default_factory=list)
    """(ts, wall time, item) of each sample since a jump, oldest first."""

    def seen(self, ts_ms: int, now_ms: int) -> None:
        if self.last_ms is None or ts_ms > self.last_ms:
            self.last_ms, self.last_wall_ms = ts_ms, now_ms

    def steady(self, bounds: TimeBounds, ts_ms: int, now_ms: int) -> bool:
        """The hot path, `TimeBounds.refuse` and `_judge` in one: whether ``ts_ms`` is within
        the bounds and no jump from the stream's last sample, with nothing held (then the
        stream moves on to it, and the sample is taken as is)."""
        last = self.last_ms
        if last is None or self.held:
            return False
        if ts_ms > now_ms + bounds.max_future_ms or ts_ms < EPOCH_FLOOR_MS:
            return False
        if bounds.max_past_ms is not None and ts_ms < now_ms - bounds.max_past_ms:
            return False
        moved = ts_ms - last
        if moved < -bounds.max_jump_ms:
            return False
        if moved > 0:
            if moved - max(0, now_ms - self.last_wall_ms) > bounds.max_jump_ms:
                return False
            self.last_ms, self.last_wall_ms = ts_ms, now_ms
        return True


@dataclass
class _Verdict(Generic[T]):
    take: list[T]
    """Items to window now, in order (one, or the confirmed held ones after a resync)."""
    dropped: list[T]
    """Held items given up: counted as ``timestamp`` by the caller."""
    resync: str = ""
    """Non-empty when the stream's time moved: "ahead" or "back"."""


def _judge(clock: _Clock[T], bounds: TimeBounds, ts_ms: int, now_ms: int, item: T) -> _Verdict[T]:
    """What to do with a sample at ``ts_ms`` (within ``bounds.refuse``) on this stream."""
    if clock.last_ms is None or not bounds.jumps(clock.last_ms, clock.last_wall_ms, ts_ms, now_ms):
        dropped = [i for _, _, i in clock.held]
        clock.held.clear()
        clock.seen(ts_ms, now_ms)
        return _Verdict([item], dropped)
    dropped = []
    if clock.held:
        prev_ts, prev_wall, _ = clock.held[-1]
        if ts_ms <= prev_ts or bounds.jumps(prev_ts, prev_wall, ts_ms, now_ms):
            dropped = [i for _, _, i in clock.held]  # the held ones do not agree: start again
            clock.held.clear()
    clock.held.append((ts_ms, now_ms, item))
    if len(clock.held) < bounds.resync_after:
        return _Verdict([], dropped)
    direction = "back" if clock.held[0][0] < clock.last_ms else "ahead"
    take = [i for _, _, i in clock.held]
    clock.last_ms, clock.last_wall_ms = clock.held[-1][0], clock.held[-1][1]
    clock.held.clear()
    return _Verdict(take, dropped, direction)


@dataclass
class WaveformWindow:
    """Per device and signal: blocks in, windows of ``length`` samples every ``hop``."""

    length: int
    hop: int
    excluded: Excluded = field(default_factory=Excluded)
    bounds: TimeBounds | None = None
    """Timestamp checks against the box's clock (given ``now_ms``); none in pure use."""
    min_rate_hz: float = 1.0
    max_rate_hz: float = 1_000_000.0
    max_block: int = 100_000
    """Samples in one block at most (10 s at 10 kHz): more is refused, not windowed."""
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _t0_us: int = 0
    _rate: float = 0.0
    _next_us: float | None = None
    _seqs: collections.deque[tuple[int, int, int]] = field(default_factory=collections.deque)
    """(sample offset in the buffer, length, source seq) of each buffered block."""
    _clock: _Clock[tuple[np.ndarray, int, float, int | None, bool]] = field(default_factory=_Clock)

    def add(
        self,
        block: Waveform,
        *,
        seq: int | None,
        node: str,
        good: bool = True,
        now_ms: int | None = None,
        rate_hz: float | None = None,
    ) -> list[tuple[np.ndarray, float, Window]]:
        """Take one block; return the windows it completes (samples, rate, provenance).

        ``rate_hz``: the rate the birth announced; a block at another rate is refused.
        """
        checked = self._check(block, rate_hz)
        if isinstance(checked, str):
            return []
        samples, rate = checked
        t0_us = block.t0_us
        if self.bounds is None or now_ms is None:
            return self._take(samples, t0_us, rate, seq, node, good)
        n = len(samples)
        t0_ms = t0_us // 1000
        end_ms = (t0_us + int(n * 1e6 / rate)) // 1000  # the rate is bounded: finite
        if end_ms <= now_ms + self.bounds.max_future_ms and self._clock.steady(
            self.bounds, t0_ms, now_ms
        ):
            return self._take(samples, t0_us, rate, seq, node, good)
        why = self.bounds.refuse(t0_ms, now_ms) or self.bounds.refuse(end_ms, now_ms)
        if why is not None:
            self.excluded.add("timestamp", n, f"a block at t0_us {short(t0_us)}: {why}")
            return []
        verdict = _judge(self._clock, self.bounds, t0_ms, now_ms, (samples, t0_us, rate, seq, good))
        for x, *_ in verdict.dropped:
            self.excluded.add(
                "timestamp", len(x), "blocks far from the stream's time, not confirmed by more"
            )
        if verdict.resync == "back":  # the buffered samples are of another time
            self._reset("timestamp")
        if verdict.resync:
            self.excluded.details["timestamp"] = (
                f"the stream's time moved {verdict.resync} by more than"
                f" {_span(self.bounds.max_jump_ms)} for {self.bounds.resync_after} blocks in a"
                " row: windowing restarts there"
            )
        out = []
        for x, t0, r, s, g in verdict.take:
            out += self._take(x, t0, r, s, node, g)
        return out

    def _check(self, block: Waveform, rate_hz: float | None) -> tuple[np.ndarray, float] | str:
        """The block's samples in engineering units and its rate, or why it is refused
        (counted here)."""
        size = SAMPLE_BYTES.get(block.dtype)
        raw = block.samples
        if size is None or not isinstance(raw, bytes) or not raw or len(raw) % size:
            n = len(raw) if isinstance(raw, bytes) else 0
            return self._refuse("samples", 1, f"{n} bytes are not whole {block.dtype} samples")
        n = len(raw) // size
        if n > self.max_block:
            return self._refuse("samples", n, f"{n} samples in one block (max {self.max_block})")
        rate = block.rate_hz
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not self.min_rate_hz <= rate <= self.max_rate_hz  # NaN fails this too
        ):
            return self._refuse(
                "rate",
                n,
                f"rate_hz {short(rate)} (need {self.min_rate_hz:g} to {self.max_rate_hz:g})",
            )
        if rate_hz is not None and abs(rate - rate_hz) > 1e-9 * rate_hz:
            return self._refuse("rate", n, f"rate_hz {short(rate)}, but the birth says {rate_hz:g}")
        scale = block.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return self._refuse("scale", n, f"scale {short(scale)}")
        if not math.isfinite(scale) or scale == 0:
            return self._refuse("scale", n, f"scale {short(scale)}")
        t0 = block.t0_us
        if isinstance(t0, bool) or not isinstance(t0, int) or not -(2**62) < t0 < 2**62:
            # beyond 2**62 us (146,000 years) no clock is needed to refuse it, and the float
            # arithmetic of the window's end would overflow
            return self._refuse("timestamp", n, f"t0_us {short(t0)} is no time of this era")
        samples = np.frombuffer(raw, dtype=_NUMPY_DTYPES[block.dtype])
        if block.dtype != "f32" or scale != 1.0:  # else a read-only view is all it takes
            with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are counted later
                samples = samples.astype(np.float32)
                samples *= np.float32(scale)
        return samples, float(rate)

    def _refuse(self, reason: str, n: int, detail: str) -> str:
        self.excluded.add(reason, n, detail)
        return reason

    def _take(
        self, samples: np.ndarray, t0_us: int, rate: float, seq: int | None, node: str, good: bool
    ) -> list[tuple[np.ndarray, float, Window]]:
        if not good:
            self.excluded.add("bad_quality", len(samples))
            self._reset("bad_quality")
            return []
        period_us = 1e6 / rate
        if self._next_us is not None and rate == self._rate:
            drift = t0_us - self._next_us
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
            self._t0_us = t0_us
            self._rate = rate
        finite = np.isfinite(samples)
        if not finite.all():
            self.excluded.add("nan", int((~finite).sum()))
        self._seqs.append((len(self._buffer), len(samples), -1 if seq is None else seq))
        self._buffer = np.concatenate([self._buffer, samples])
        self._next_us = t0_us + len(samples) * period_us
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

    def reset(self, reason: str) -> None:
        """Forget the buffered samples (counted under ``reason``) and the stream's time."""
        self._reset(reason)
        for x, *_ in (i for _, _, i in self._clock.held):
            self.excluded.add(reason, len(x))
        self._clock = _Clock()

    def _reset(self, reason: str) -> None:
        self.excluded.add(reason, len(self._buffer))
        self._buffer = np.zeros(0, dtype=np.float32)
        self._seqs.clear()
        self._next_us = None


_SEQ_BITS: Final = 9
"""Each held sample's source seq (0..255, or none) in the low bits of its time word."""
_NARROW_SPAN_MS: Final = 1 << (32 - _SEQ_BITS)
"""Windows and hop spanning less than this (2.3 h) keep a sample's time in 4 bytes."""
_WIDE_SPAN_MS: Final = 1 << (64 - _SEQ_BITS)


class SlowWindow:
    """Per device and tag: (ts, value) samples in, a window of ``length_ms`` every ``hop_ms``,
    aligned to event time (the data's own timestamps, so replays at any speed agree): the
    windows end at ``phase_ms`` past multiples of ``hop_ms``.

    The held samples are two flat arrays, 12 bytes a sample: the value (8-byte float) and
    one 4-byte word of its time (milliseconds after ``_base``, the start of the last window
    closed, so it never exceeds ``length_ms + hop_ms``) and its source seq (+1, 0 for none,
    in the low 9 bits); 8 bytes for a window and hop of more than 2.3 hours. A deque of
    Python numbers cost about 100 bytes a sample (20,000 tags at 10 Hz held 500 MB), and a
    window is now two array views, not three deques walked in Python.
    """

    __slots__ = (
        "_base",
        "_clock",
        "_excluded",
        "_last_ts",
        "_limit",
        "_next_end",
        "_stale",
        "_total",
        "_values",
        "_words",
        "bounds",
        "hop_ms",
        "length_ms",
        "phase_ms",
    )

    def __init__(
        self,
        length_ms: int,
        hop_ms: int,
        phase_ms: int = 0,
        excluded: Excluded | None = None,
        bounds: TimeBounds | None = None,
    ) -> None:
        self.length_ms = length_ms
        self.hop_ms = hop_ms
        self.phase_ms = phase_ms
        self.bounds = bounds
        """Timestamp checks against the box's clock (given ``now_ms``); none in pure use."""
        self._excluded = excluded
        """Created on the first exclusion: most tags never have one (200 bytes each)."""
        span = length_ms + hop_ms
        if span >= _WIDE_SPAN_MS:
            raise ValueError(f"a slow window and hop of {span} ms: at most {_WIDE_SPAN_MS - 1}")
        self._words = array.array("I" if span < _NARROW_SPAN_MS else "Q")
        self._limit = _NARROW_SPAN_MS if span < _NARROW_SPAN_MS else _WIDE_SPAN_MS
        """A held time is at most this far after ``_base``."""
        self._stale = 0
        """Samples dropped before their window's close would have dropped them (to make
        room, `_make_room`): counted in a reset until then, as if still held."""
        self._values = array.array("d")
        self._base = 0
        self._last_ts: int | None = None
        self._next_end: int | None = None
        self._total = 0
        self._clock: _Clock[tuple[int, float | None, bool, int | None, tuple[str, str] | None]] = (
            _Clock()
        )

    @property
    def excluded(self) -> Excluded:
        """Samples kept out of the features since the caller last cleared it."""
        if self._excluded is None:
            self._excluded = Excluded()
        return self._excluded

    @property
    def has_excluded(self) -> bool:
        """Whether anything was excluded (and not yet taken): without creating `excluded`."""
        e = self._excluded
        return e is not None and bool(e.counts or e.details)

    @property
    def held(self) -> int:
        """Samples held for the windows to come."""
        return len(self._values)

    @property
    def nbytes(self) -> int:
        """Bytes of the held samples' arrays (their allocation may be a little larger)."""
        return len(self._values) * 8 + len(self._words) * self._words.itemsize

    def add(
        self,
        ts: int,
        value: float | None,
        *,
        good: bool,
        seq: int | None,
        node: str,
        now_ms: int | None = None,
        refuse: tuple[str, str] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        """Take one sample; return the windows that closed before it.

        ``refuse``: (reason, detail) of a sample the caller knows is bad (a string where the
        birth declared a number): it still moves the windows on and counts in their total.
        ``seq``: the source message's (0..255, the contract's); any other is held as none.
        """
        if type(ts) is not int:
            if isinstance(ts, bool) or not isinstance(ts, int):
                self._total += 1
                self.excluded.add("timestamp", 1, f"ts {short(ts)} is not an integer")
                return []
            ts = int(ts)  # an int subclass
        if self.bounds is None or now_ms is None:
            if not -(2**62) < ts < 2**62:  # no clock to compare with: still never overflow
                self._total += 1
                self.excluded.add("timestamp", 1, f"ts {short(ts)}")
                return []
            return self._take(ts, value, good, seq, node, refuse)
        if self._clock.steady(self.bounds, ts, now_ms):
            return self._take(ts, value, good, seq, node, refuse)
        why = self.bounds.refuse(ts, now_ms)
        if why is not None:
            self._total += 1  # a sample seen, bad: in the window's total like out-of-order ones
            self.excluded.add("timestamp", 1, f"ts {short(ts)}: {why}")
            return []
        verdict = _judge(self._clock, self.bounds, ts, now_ms, (ts, value, good, seq, refuse))
        if verdict.dropped:
            self._total += len(verdict.dropped)
            self.excluded.add(
                "timestamp", len(verdict.dropped), "samples far from the tag's time, not confirmed"
            )
        if verdict.resync == "back":  # the buffered samples are of another time: forget them
            self.reset("timestamp")
        if verdict.resync:
            self.excluded.details["timestamp"] = (
                f"the tag's time moved {verdict.resync} by more than"
                f" {_span(self.bounds.max_jump_ms)} for {self.bounds.resync_after} samples in a"
                " row: windowing restarts there"
            )
        out = []
        for t, v, g, s, r in verdict.take:
            out += self._take(t, v, g, s, node, r)
        return out

    def push(
        self, ts: int, value: float, good: bool, seq: int | None, node: str, now_ms: int
    ) -> list[tuple[np.ndarray, np.ndarray, Window]] | None:
        """`add` of a float, in one call. What nearly every sample is (good, finite, later
        than the last, near the clock and the tag's time, inside the open window) is held
        here, and None returned: nothing closed, nothing excluded; anything else goes
        through `add`, which judges it (its windows returned, maybe none)."""
        c, b = self._clock, self.bounds
        last_ms, last, next_end = c.last_ms, self._last_ts, self._next_end
        if (
            good
            and type(ts) is int
            and type(value) is float
            and value - value == 0.0  # finite
            and b is not None
            and last_ms is not None
            and last is not None
            and next_end is not None
            and last < ts < next_end
            and not c.held
            and EPOCH_FLOOR_MS <= ts <= now_ms + b.max_future_ms
            and (b.max_past_ms is None or ts >= now_ms - b.max_past_ms)
        ):
            moved = ts - last_ms
            if moved > 0 and moved - max(0, now_ms - c.last_wall_ms) <= b.max_jump_ms:
                c.last_ms, c.last_wall_ms = ts, now_ms  # `_Clock.steady`, inline
                self._total += 1
                words = self._words
                if not words:  # (after a jump, or a window that took the last of them)
                    self._base = ts
                elif ts - self._base >= self._limit:
                    self._make_room()
                words.append(
                    ((ts - self._base) << _SEQ_BITS)
                    | (seq + 1 if type(seq) is int and 0 <= seq < 256 else 0)
                )
                self._values.append(value)
                self._last_ts = ts
                return None
        return self.add(ts, value, good=good, seq=seq, node=node, now_ms=now_ms)

    def _take(
        self,
        ts: int,
        value: float | None,
        good: bool,
        seq: int | None,
        node: str,
        refuse: tuple[str, str] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        next_end = self._next_end
        # the hot path: no window closes
        out = [] if next_end is not None and ts < next_end else self._roll(ts, node)
        self._total += 1
        last = self._last_ts
        if (
            refuse is None
            and good
            and type(value) is float
            and value - value == 0.0  # finite: inf - inf and NaN - NaN are NaN
            and (last is None or ts > last)
        ):
            self._hold(ts, value, seq)
            return out
        number = value if type(value) is float else as_number(value)
        if refuse is not None:
            self.excluded.add(refuse[0], 1, refuse[1])
        elif not good:
            self.excluded.add("bad_quality")
        elif number is None and value is not None:
            bits = value.bit_length() if isinstance(value, int) else 0
            self.excluded.add("range", 1, f"an integer of {bits} bits: no 64-bit type holds it")
        elif number is None or not math.isfinite(number):
            self.excluded.add("nan")
        elif last is not None and ts == last:
            self.excluded.add("duplicate")
        elif last is not None and ts < last:
            self.excluded.add("out_of_order")
        else:
            self._hold(ts, number, seq)
        return out

    def _hold(self, ts: int, value: float, seq: int | None) -> None:
        words = self._words
        if not words:
            self._base = ts
        elif ts - self._base >= self._limit:
            self._make_room()
        tag = seq + 1 if type(seq) is int and 0 <= seq < 256 else 0
        words.append(((ts - self._base) << _SEQ_BITS) | tag)
        self._values.append(value)
        self._last_ts = ts

    def _roll(self, ts: int, node: str) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        """Close the windows that end at or before ``ts``."""
        out: list[tuple[np.ndarray, np.ndarray, Window]] = []
        if self._next_end is None:
            self._next_end = self._end_after(ts)
        while ts >= self._next_end:  # windows ending before this sample are complete
            out.extend(self._close(self._next_end, node))
            self._next_end += self.hop_ms
            words = self._words
            if not words or (words[-1] >> _SEQ_BITS) + self._base < self._next_end - self.length_ms:
                # Nothing buffered reaches the next window: jump straight to the one
                # holding this sample instead of closing empty windows hop by hop (a
                # stamp a year on is 3 million hops of 10 s).
                self._clear()
                self._next_end = max(self._next_end, self._end_after(ts))
        return out

    def _clear(self) -> None:
        del self._words[:]
        del self._values[:]
        self._stale = 0

    def _make_room(self) -> None:
        """Drop the samples no window to come holds, and count the times from the start of
        the next window: a sample stamped before a far-off one that moved the windows on
        (bad, so never held) would otherwise be held hours before the next (never: a close
        drops what the window no longer holds and moves ``_base`` up)."""
        words, values = self._words, self._values
        assert self._next_end is not None  # a sample was taken
        start = self._next_end - self.length_ms
        dtype = np.uint32 if words.itemsize == 4 else np.uint64
        shift = start - self._base
        view: np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]]
        view = np.frombuffer(words, dtype=dtype)
        k = int(np.searchsorted(view, shift << _SEQ_BITS))
        del view
        if k:
            del words[:k]
            del values[:k]
            self._stale += k
        if words:
            view = np.frombuffer(words, dtype=dtype)
            np.subtract(view, shift << _SEQ_BITS, out=view, dtype=dtype, casting="unsafe")
            del view
        self._base = start

    @property
    def next_end(self) -> int | None:
        """The end of the next window this tag closes (None before its first sample): it
        has closed every window ending before this."""
        return self._next_end

    def _end_after(self, ts: int) -> int:
        """The end of the first window that ends after ``ts``."""
        hops = (ts - self.phase_ms) // self.hop_ms + 1
        return hops * self.hop_ms + self.phase_ms

    def reset(self, reason: str) -> None:
        """Forget every buffered sample (counted under ``reason``) and the tag's time."""
        held = len(self._clock.held)
        self.excluded.add(reason, len(self._values) + held + self._stale)
        self._total += held
        self._clear()
        self._last_ts = None
        self._next_end = None
        self._clock = _Clock()

    def _close(self, end: int, node: str) -> list[tuple[np.ndarray, np.ndarray, Window]]:
        start = end - self.length_ms
        total, self._total = self._total, 0
        self._stale = 0  # this close would have dropped them
        words, values = self._words, self._values
        if not words:
            return []
        dtype = np.uint32 if words.itemsize == 4 else np.uint64
        if start > self._base:  # drop what this window no longer holds; count from its start
            shift = start - self._base
            view: np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]]
            view = np.frombuffer(words, dtype=dtype)
            k = int(np.searchsorted(view, shift << _SEQ_BITS))
            del view  # an array exporting its buffer cannot be resized
            if k:
                del words[:k]
                del values[:k]
            if not words:
                return []
            view = np.frombuffer(words, dtype=dtype)
            np.subtract(view, shift << _SEQ_BITS, out=view, dtype=dtype, casting="unsafe")
            del view
            self._base = start
        w: np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]] = np.frombuffer(words, dtype=dtype)
        n = len(w)
        if int(w[-1] >> _SEQ_BITS) + self._base >= end:  # (never: a later sample closes it)
            n = int(np.searchsorted(w, (end - self._base) << _SEQ_BITS))
            if not n:
                return []
        ts = np.right_shift(w[:n], _SEQ_BITS, dtype=dtype).astype(np.int64)
        ts += self._base
        first, last = int(w[0]) & 511, int(w[n - 1]) & 511
        del w
        x = np.frombuffer(values, dtype=np.float64)[:n].copy()
        return [
            (
                ts,
                x,
                Window(
                    start=start,
                    end=end,
                    good=n,
                    total=max(total, n),
                    seq_first=first - 1 if first else None,
                    seq_last=last - 1 if last else None,
                    node=node,
                ),
            )
        ]


def as_number(value: object) -> float | None:
    """A sample as a float; None for no number: JSON allows 10**400, no integer datatype
    holds more than 64 bits, and numpy cannot even test such an int for NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return None
    return float(value)
