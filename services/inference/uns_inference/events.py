"""One event per fault: the hysteresis state machine of one device and event kind (pure).

    normal ──score ≥ raise──▶ pending ──stayed ≥ raise for min_raise_s──▶ open  (raised)
       ▲                         │ score < raise: a blip, forgotten              │
       └─────────────────────────┘                                               │
       └──── stayed < clear for min_clear_s (cleared: same id, count, peak) ◀────┘

While open, every new upward crossing of ``raise`` only increments ``count``: no new
event, so a score hovering around its threshold never floods the namespace (or the
cloud behind the bridge). Times are data times (the features' window ends, ms), so a
replay at any speed raises the same events as the live run.

An open event outlives the process: `OpenEvent` is what the service keeps of it in its
state file, and `EventState.reopen` puts it back after a restart, so the same id goes
on (and clears) instead of a second ``raised``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

Phase = Literal["normal", "pending", "open"]
Severity = Literal["warning", "critical"]


@dataclass(frozen=True, slots=True)
class Hysteresis:
    raise_: float
    clear: float
    min_raise_ms: int
    min_clear_ms: int
    critical: float

    @classmethod
    def of(
        cls, raise_: float, clear: float, min_raise_s: float, min_clear_s: float, critical: float
    ) -> Hysteresis:
        return cls(
            raise_,
            min(clear, raise_),
            round(min_raise_s * 1000),
            round(min_clear_s * 1000),
            critical,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """An event to publish: ``raised`` (score = the score then) or ``cleared`` (score = peak)."""

    state: Literal["raised", "cleared"]
    started: int
    """Data time the breach began (ms)."""
    ts: int
    """Data time of the window that caused the transition (ms)."""
    score: float
    peak: float
    count: int
    severity: Severity


class EventState:
    """The state of one device and kind; feed it every score with `update`."""

    __slots__ = ("above", "below_since", "count", "last_ts", "peak", "phase", "since")

    def __init__(self) -> None:
        self.phase: Phase = "normal"
        self.since = 0
        """pending/open: data time of the first window at or above raise."""
        self.peak = 0.0
        self.count = 0
        self.above = False
        """open: whether the last window was at or above raise (to count new crossings)."""
        self.below_since: int | None = None
        """open: data time of the first of the current run of windows below clear."""
        self.last_ts: int | None = None

    @property
    def is_open(self) -> bool:
        return self.phase == "open"

    def reopen(self, event: OpenEvent) -> None:
        """Continue an event that was open when the service stopped."""
        self.phase, self.since, self.peak, self.count = (
            "open",
            event.started,
            event.peak,
            event.count,
        )
        self.above, self.below_since, self.last_ts = event.above, event.below_since, event.last_ts

    def update(self, ts: int, score: float, h: Hysteresis) -> Transition | None:
        self.last_ts = ts
        above = score >= h.raise_
        if self.phase == "normal":
            if not above:
                return None
            self.phase, self.since, self.peak = "pending", ts, score
        if self.phase == "pending":
            if not above:  # dropped back before min_raise_s: a blip
                self.phase = "normal"
                return None
            self.peak = max(self.peak, score)
            if ts - self.since < h.min_raise_ms:
                return None
            self.phase, self.count, self.above, self.below_since = "open", 1, True, None
            return Transition("raised", self.since, ts, score, self.peak, 1, _severity(score, h))
        # open
        self.peak = max(self.peak, score)
        if above and not self.above:
            self.count += 1
        self.above = above
        if score >= h.clear:
            self.below_since = None
            return None
        if self.below_since is None:
            self.below_since = ts
        if ts - self.below_since < h.min_clear_ms:
            return None
        self.phase = "normal"
        return Transition(
            "cleared", self.since, ts, self.peak, self.peak, self.count, _severity(self.peak, h)
        )


def _severity(score: float, h: Hysteresis) -> Severity:
    return "critical" if score >= h.critical else "warning"


class OpenEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One open event as the state file keeps it (enough to go on with the same id)."""

    device: str
    kind: str
    id: str
    started: int
    peak: float
    count: int
    above: bool
    below_since: int | None = None
    last_ts: int | None = None
    top: str = ""
    """The top features named when it was raised."""

    @classmethod
    def of(cls, device: str, kind: str, id: str, top: str, state: EventState) -> OpenEvent:
        return cls(
            device=device,
            kind=kind,
            id=id,
            started=state.since,
            peak=state.peak,
            count=state.count,
            above=state.above,
            below_since=state.below_since,
            last_ts=state.last_ts,
            top=top,
        )


class _StateFile(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    v: int = 1
    events: list[OpenEvent] = []


_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(_StateFile)


def encode_open(events: Iterable[OpenEvent]) -> bytes:
    return _state_encoder.encode(
        _StateFile(events=sorted(events, key=lambda e: (e.device, e.kind)))
    )


def decode_open(data: bytes) -> list[OpenEvent]:
    """The open events of a state file; `ValueError` saying why it cannot be read."""
    try:
        state = _state_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    if state.v != 1:
        raise ValueError(f"unknown state file version {state.v}")
    return state.events
