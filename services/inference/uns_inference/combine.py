"""The latest value of every feature of a device, and when a model's input row is ready (pure).

Waveform windows and slow-tag windows arrive as separate features messages, each with
its own window. A model needs several of them at once, so per device we keep the
latest good value of each feature with its data time (the window's end). A row is
ready when a message has just updated at least one of the model's features and every
one of its features is known and *fresh*: no older than ``max_age_ms`` before the
triggering window's end. A stale feature (its featurizer window stopped, its tag went
bad) holds the device's scoring back until it is refreshed, rather than scoring on a
value that no longer describes the machine. Training (`uns_inference.record`) uses the
same rule, so a model sees in training the rows it will see in service.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from uns.payloads import Metric


@dataclass(frozen=True, slots=True)
class Row:
    values: NDArray[np.float64]
    uncertain: bool
    """A feature of the row had quality ``uncertain``."""


@dataclass(frozen=True, slots=True)
class NotReady:
    missing: list[str]
    """Never seen (or only bad)."""
    stale: list[str]
    """Known, but older than the age limit."""


@dataclass
class DeviceFeatures:
    """Latest value, data time and quality of each feature of one device."""

    values: dict[str, float] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)

    def update(self, metrics: Iterable[Metric], ts: int) -> set[str]:
        """Take a features message's metrics (``ts``: its window end); return what changed.

        Bad quality, non-numbers and non-finite values are not taken: the feature keeps
        its previous value, which goes stale if nothing good follows.
        """
        updated: set[str] = set()
        for m in metrics:
            v = m.value
            if m.quality == "bad" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            value = float(v)
            if not math.isfinite(value):
                continue
            self.values[m.name] = value
            self.times[m.name] = m.ts if m.ts is not None else ts
            if m.quality == "uncertain":
                self.uncertain.add(m.name)
            else:
                self.uncertain.discard(m.name)
            updated.add(m.name)
        return updated

    def row(self, names: Sequence[str], ts: int, max_age_ms: int) -> Row | NotReady:
        missing = [n for n in names if n not in self.values]
        stale = [n for n in names if n in self.times and ts - self.times[n] > max_age_ms]
        if missing or stale:
            return NotReady(missing, stale)
        values = np.fromiter((self.values[n] for n in names), dtype=np.float64, count=len(names))
        return Row(values, any(n in self.uncertain for n in names))

    def clear(self) -> None:
        self.values.clear()
        self.times.clear()
        self.uncertain.clear()
