"""A device's features by window, and when a model's input row is complete (pure).

The featurizer publishes a device's features in more than one message: one per waveform
window, one per slow-tag window end (all the device's slow tags), and a late tag or a
second waveform signal may come in another message with the same window end. A model
needs several features at once, so per device we gather each feature's good value under
its window's end (``window.end``, the data time). **A row is complete when every feature
the model needs is present for the same window end**: it is scored once, and never from
a mix of one window's features and another's. A window whose features stop short (a tag
went bad, a signal stopped) is given up once the device's data has moved ``max_age_ms``
past its end, unscored. A model whose features come from windows that never end together
(1 s vibration windows and 10 s slow-tag windows) has no complete row: training refuses
it. Training (`uns_inference.record`) uses the same rule, so a model sees in training the
rows it will see in service: one per window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from uns.payloads import Metric, Window

MAX_WINDOWS: Final = 256
"""Window ends held per device at most (the oldest go first): a hostile or broken
producer stamping every message with a new end cannot take the memory."""


@dataclass(frozen=True, slots=True)
class Row:
    values: NDArray[np.float64]
    uncertain: bool
    """A feature of the row had quality ``uncertain``."""
    window: Window
    """The window scored: its start and end; counts and source messages of its parts."""


@dataclass(frozen=True, slots=True)
class NotReady:
    missing: list[str]
    """Not (yet) present for this window: never seen, bad or not finite."""


@dataclass(frozen=True, slots=True)
class GivenUp:
    """A window a model took part of but never all of."""

    end: int
    missing: list[str]


@dataclass
class _Window:
    values: dict[str, float] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)
    parts: list[Window] = field(default_factory=list)
    """The ``window`` of each message that brought features to it."""


def merged(parts: Sequence[Window], end: int) -> Window:
    """One window of a row's parts: the earliest start, ``end``, counts summed, the first
    part's first source message and the last part's last (one part: that part)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Window(start=end, end=end, good=0, total=0)
    return Window(
        start=min(p.start for p in parts),
        end=end,
        good=sum(p.good for p in parts),
        total=sum(p.total for p in parts),
        seq_first=parts[0].seq_first,
        seq_last=parts[-1].seq_last,
        node=parts[0].node,
    )


@dataclass
class DeviceFeatures:
    """The features of one device's recent windows, by window end, and what each model
    (a key: its kind) has scored of them."""

    windows: dict[int, _Window] = field(default_factory=dict)
    scored: dict[str, int] = field(default_factory=dict)
    """key -> the end of the last window it scored: older ones are not scored after it."""
    taken: dict[int, set[str]] = field(default_factory=dict)
    """Window end -> the keys that took part of it (for `expire`)."""

    def update(self, metrics: Iterable[Metric], end: int, window: Window | None = None) -> set[str]:
        """Take a features message's metrics for the window ending at ``end``; return what
        it brought.

        Bad quality, non-numbers and non-finite values are not taken: the window lacks
        that feature and is not scored by a model that needs it.
        """
        w = self.windows.get(end)
        if w is None:
            w = self.windows[end] = _Window()
            if len(self.windows) > MAX_WINDOWS:
                oldest = min(self.windows)
                del self.windows[oldest]
                self.taken.pop(oldest, None)
        updated: set[str] = set()
        for m in metrics:
            v = m.value
            if m.quality == "bad" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            value = float(v)
            if not math.isfinite(value):
                continue
            w.values[m.name] = value
            if m.quality == "uncertain":
                w.uncertain.add(m.name)
            else:
                w.uncertain.discard(m.name)
            updated.add(m.name)
        if updated and window is not None and window not in w.parts:
            w.parts.append(window)
        return updated

    def row(self, names: Sequence[str], end: int) -> Row | NotReady:
        """The row of the window ending at ``end``, if every one of ``names`` is present."""
        w = self.windows.get(end)
        if w is None:
            return NotReady(list(names))
        missing = [n for n in names if n not in w.values]
        if missing:
            return NotReady(missing)
        values = np.fromiter((w.values[n] for n in names), dtype=np.float64, count=len(names))
        return Row(values, any(n in w.uncertain for n in names), merged(w.parts, end))

    def offer(self, key: str, names: Sequence[str], end: int) -> Row | NotReady | None:
        """For model ``key``, after an update of window ``end``: its row if complete and not
        yet scored (it is then marked scored), NotReady if incomplete, None when ``key``
        scored this window or a later one already."""
        last = self.scored.get(key)
        if last is not None and end <= last:
            return None
        row = self.row(names, end)
        if isinstance(row, Row):
            self.scored[key] = end
            self.taken.get(end, set()).discard(key)
        else:
            self.taken.setdefault(end, set()).add(key)
        return row

    def expire(
        self, newest: int, max_age_ms: int, models: Mapping[str, Sequence[str]]
    ) -> list[tuple[str, GivenUp]]:
        """Forget the windows no model needs any more: those every model (``models``: key ->
        its features) has scored or passed, and those ending more than ``max_age_ms``
        before ``newest``. Return (key, window) for each forgotten window a model took part
        of but never completed, oldest first."""
        floor = min((self.scored.get(k, -1) for k in models), default=newest)
        given: list[tuple[str, GivenUp]] = []
        for end in sorted(self.windows):
            if end > floor and newest - end <= max_age_ms:
                continue
            w = self.windows.pop(end)
            for key in self.taken.pop(end, ()):
                names = models.get(key, ())
                given.append((key, GivenUp(end, [n for n in names if n not in w.values])))
        return given

    def clear(self) -> None:
        self.windows.clear()
        self.scored.clear()
        self.taken.clear()
