"""OEE from the tags a plant has (pure: fed samples with their timestamps, so a simulated
shift of hours is computed in a test in moments). The rule is also in uns-schema/README.md
(OEE).

Per device, in data time (the samples' own timestamps, ms), sample-and-hold: a value holds
from its timestamp until the next one. Time is booked in whole-minute buckets:

* **planned time**: time inside a shift of the calendar and outside its breaks, from the
  device's first sample on (a service that starts mid-shift knows nothing before);
* **run time**: planned time while ``run_state`` is true and the device is online; while
  it is offline (its raw death) its time is planned, not run (flag ``offline``);
* **count**: increments of its part or stroke counter, booked in the minute they are seen
  (in planned time only). A counter that goes down rolled over when its datatype has a
  range (uint16/32/64) and it was in the top sixteenth of it (flag ``counter_rollover``),
  otherwise it was reset and counts from 0 (flag ``counter_reset``);
* **good**: the increments of its good counter, else the count less the increments of its
  scrap counter, else the count (quality 1.0, flag ``quality_assumed``).

A group (cell, line) sums its devices' inputs: availability = run / planned, performance =
count / ideal count (ideal count = run time / ideal cycle time, summed), quality = good /
count (1.0 without any count), OEE = their product.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

MINUTE_MS = 60_000
UNSIGNED = {"uint8": 2**8, "uint16": 2**16, "uint32": 2**32, "uint64": 2**64}
FUTURE_MS = 5 * MINUTE_MS
"""A sample stamped further ahead of the box's clock than this is refused (`plausible`)."""
PAST_MS = 24 * 60 * MINUTE_MS
"""... and one older than this: OEE books the current shift and hour, never last week."""
MAX_GAP_MS = 24 * 60 * MINUTE_MS
"""Time between two samples of a device beyond this (a clock jump) is booked as nothing."""


def plausible(ts: int, now: int) -> bool:
    """Whether a sample's timestamp may be booked: near the box's clock. A hostile or broken
    one (2^63 - 1 ms, 31 years ahead) would otherwise have the booking walk minute by minute
    to it, and every later sample would be before it."""
    return now - PAST_MS <= ts <= now + FUTURE_MS


def hhmm(text: str) -> int:
    """Minutes after midnight of ``HH:MM``; ValueError otherwise."""
    hours, sep, minutes = text.partition(":")
    if not sep or len(minutes) != 2 or not hours.isdigit() or not minutes.isdigit():
        raise ValueError(f"{text!r} is not HH:MM")
    h, m = int(hours), int(minutes)
    if h > 23 or m > 59:
        raise ValueError(f"{text!r} is not a time of day")
    return h * 60 + m


@dataclass(frozen=True)
class ShiftSpec:
    name: str
    start_min: int
    """Minutes after local midnight."""
    minutes: int
    breaks: tuple[tuple[int, int], ...] = ()
    """(minutes after the shift's start, length in minutes)."""


class Calendar:
    """Which shift a minute belongs to, and whether it is planned production time."""

    def __init__(self, shifts: Iterable[ShiftSpec], timezone: str = "UTC") -> None:
        self.shifts = tuple(shifts)
        self.tz = UTC if timezone == "UTC" else ZoneInfo(timezone)
        self.minute = lru_cache(maxsize=4096)(self._minute)

    def _minute(self, minute: int) -> tuple[tuple[str, int, int] | None, bool]:
        """(the shift instance: name, start and end ms; None outside every shift), planned."""
        local = datetime.fromtimestamp(minute * 60, self.tz)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        for days in (0, -1):  # a shift that started yesterday may run past midnight
            day = midnight + timedelta(days=days)
            for s in self.shifts:
                start = day + timedelta(minutes=s.start_min)
                offset = (local - start).total_seconds() / 60
                if 0 <= offset < s.minutes:
                    start_ms = int(start.timestamp() * 1000)
                    shift = (s.name, start_ms, start_ms + s.minutes * MINUTE_MS)
                    on_break = any(b <= offset < b + n for b, n in s.breaks)
                    return shift, not on_break
        return None, False

    def shift(self, ts_ms: int) -> tuple[str, int, int] | None:
        return self.minute(ts_ms // MINUTE_MS)[0]

    def planned(self, ts_ms: int) -> bool:
        return self.minute(ts_ms // MINUTE_MS)[1]


@dataclass
class Bucket:
    planned_s: float = 0.0
    run_s: float = 0.0
    offline_s: float = 0.0
    count: int = 0
    good: int = 0
    scrap: int = 0


@dataclass(frozen=True)
class AssetSpec:
    """Which tags of an asset type OEE reads, and its ideal cycle time."""

    ideal_cycle_s: float
    counter: str
    run_state: str = "run_state"
    scrap: str | None = None
    good: str | None = None


class _Counter:
    """The increments of one counter tag, with resets and rollovers told apart."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.modulus: int | None = None

    def delta(self, value: int) -> tuple[int, str]:
        last, self.last = self.last, value
        if last is None or value == last:
            return 0, ""
        if value > last:
            return value - last, ""
        m = self.modulus
        if m is not None and last >= m - m // 16:
            return m - last + value, "counter_rollover"
        return value, "counter_reset"


@dataclass
class DeviceOee:
    """One device's buckets, fed its raw samples in order of arrival."""

    path: str
    spec: AssetSpec
    calendar: Calendar
    buckets: dict[int, Bucket] = field(default_factory=dict)
    last_ts: int | None = None
    running: bool = False
    online: bool = True
    has_quality: bool = False
    flags: dict[str, int] = field(default_factory=dict)
    """Flag -> the last minute it was raised in (offline, counter_reset, ...)."""
    counters: dict[str, _Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tag in (self.spec.counter, self.spec.scrap, self.spec.good):
            if tag:
                self.counters[tag] = _Counter()

    def datatypes(self, types: dict[str, str]) -> None:
        """The raw birth's datatypes: an unsigned counter rolls over at its range."""
        for tag, counter in self.counters.items():
            counter.modulus = UNSIGNED.get(types.get(tag, ""))

    def advance(self, ts: int) -> None:
        """Book the time up to ``ts`` in the state held since the last sample."""
        if self.last_ts is None:
            self.last_ts = ts
            return
        t = self.last_ts
        if ts <= t:
            return
        if ts - t > MAX_GAP_MS:  # a clock jump: nothing known of the time between
            self.flags["clock_jump"] = ts // MINUTE_MS
            self.last_ts = ts
            return
        while t < ts:
            minute = t // MINUTE_MS
            end = min(ts, (minute + 1) * MINUTE_MS)
            if self.calendar.planned(t):
                b = self.bucket(minute)
                seconds = (end - t) / 1000
                b.planned_s += seconds
                if not self.online:
                    b.offline_s += seconds
                    self.flags["offline"] = minute
                elif self.running:
                    b.run_s += seconds
            t = end
        self.last_ts = ts

    def bucket(self, minute: int) -> Bucket:
        b = self.buckets.get(minute)
        if b is None:
            b = self.buckets[minute] = Bucket()
        return b

    def sample(self, ts: int, name: str, value: object) -> None:
        """One raw metric's value at its timestamp."""
        self.advance(ts)
        s = self.spec
        if name == s.run_state:
            if isinstance(value, bool | int | float):
                self.running = bool(value)
            return
        counter = self.counters.get(name)
        if counter is None or isinstance(value, bool) or not isinstance(value, int | float):
            return
        delta, flag = counter.delta(int(value))
        minute = ts // MINUTE_MS
        if flag:
            self.flags[flag] = minute
        if name != s.counter:
            self.has_quality = True
        if delta <= 0 or not self.calendar.planned(ts):
            return
        b = self.bucket(minute)
        if name == s.counter:
            b.count += delta
        elif name == s.good:
            b.good += delta
        else:
            b.scrap += delta

    def death(self, ts: int) -> None:
        self.advance(ts)
        self.online = False

    def birth(self, ts: int) -> None:
        self.advance(ts)
        self.online = True

    def prune(self, before_minute: int) -> None:
        for minute in [m for m in self.buckets if m < before_minute]:
            del self.buckets[minute]


@dataclass(frozen=True)
class Totals:
    """A group's OEE over a window and the inputs it is computed from."""

    planned_s: float
    run_s: float
    ideal_count: float
    count: int
    good: int
    scrap: int
    flags: dict[str, list[str]]

    @property
    def availability(self) -> float:
        return self.run_s / self.planned_s if self.planned_s > 0 else 0.0

    @property
    def performance(self) -> float:
        return self.count / self.ideal_count if self.ideal_count > 0 else 0.0

    @property
    def quality(self) -> float:
        return self.good / self.count if self.count > 0 else 1.0

    @property
    def oee(self) -> float:
        return self.availability * self.performance * self.quality


def totals(devices: Iterable[DeviceOee], first: int, last: int) -> Totals:
    """The sums over minutes ``first`` to ``last`` (inclusive) of ``devices``."""
    planned = run = ideal = 0.0
    count = good = scrap = 0
    flags: dict[str, list[str]] = {}
    for d in devices:
        d_planned = d_run = 0.0
        d_count = d_good = d_scrap = 0
        for minute, b in d.buckets.items():
            if first <= minute <= last:
                d_planned += b.planned_s
                d_run += b.run_s
                d_count += b.count
                d_good += b.good
                d_scrap += b.scrap
        planned += d_planned
        run += d_run
        ideal += d_run / d.spec.ideal_cycle_s
        count += d_count
        if d.spec.good and d.has_quality:
            good += d_good
            scrap += max(0, d_count - d_good)
        elif d.spec.scrap and d.has_quality:
            good += max(0, d_count - d_scrap)
            scrap += d_scrap
        else:
            good += d_count
            if d_planned > 0:
                flags.setdefault("quality_assumed", []).append(d.path)
        for flag, minute in d.flags.items():
            if first <= minute <= last:
                flags.setdefault(flag, []).append(d.path)
    return Totals(planned, run, ideal, count, good, scrap, flags)
