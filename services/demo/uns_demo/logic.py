"""The demo device's signals: pure, deterministic for a seed, no I/O."""

from __future__ import annotations

import math
import random

from uns import Metric, MetricDef

METRICS = [
    MetricDef(
        name="temperature",
        datatype="double",
        unit="degC",
        low=0.0,
        high=120.0,
        description="Housing temperature",
        source="demo:sine",
    ),
    MetricDef(name="running", datatype="bool", description="Run state", source="demo:state"),
    MetricDef(
        name="counter",
        datatype="uint32",
        unit="1",
        low=0,
        high=2**32 - 1,
        description="Cycles completed",
        source="demo:counter",
    ),
]


class DemoDevice:
    """A machine that warms up while running and counts cycles."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.running = True
        self.counter = 0
        self.tick = 0

    def step(self) -> list[Metric]:
        self.tick += 1
        if self.running:
            self.counter += 1
        base = 45.0 if self.running else 25.0
        temperature = base + 3.0 * math.sin(self.tick / 30.0) + self.rng.gauss(0.0, 0.2)
        return [
            Metric(name="temperature", value=round(temperature, 3)),
            Metric(name="running", value=self.running),
            Metric(name="counter", value=self.counter),
        ]
