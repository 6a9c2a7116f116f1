"""Machine models: slow process values, 10 kHz bearing vibration and injected faults.

Pure numpy, no I/O, deterministic for a seed and a sequence of steps. Simulated
time (``dt`` of `Machine.step`) may run faster than the wall clock: heating and
fault ramps follow simulated time, so hours of degradation take minutes.

Vibration of a rotating asset (accelerometer at the drive-end bearing, in g):
shaft harmonics (1x, 2x), broadband noise and, with ``bearing_wear``, impacts
at the outer-race defect frequency (BPFO, from the bearing geometry and the
shaft speed) that ring a structural resonance: the signature envelope analysis
looks for, growing RMS and kurtosis with the wear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from uns_simulator.catalog import FAULT_KINDS

SENSOR_FAULTS: Final = ("sensor_drift", "stuck_sensor")
AMBIENT_C: Final = 25.0


@dataclass(frozen=True)
class Bearing:
    """Rolling-element bearing geometry (default: a 6205 deep-groove ball bearing)."""

    balls: int = 9
    ball_mm: float = 7.94
    pitch_mm: float = 39.04
    contact_deg: float = 0.0

    def frequencies(self, shaft_hz: float) -> dict[str, float]:
        """Defect frequencies in Hz: outer race, inner race, ball spin, cage."""
        r = self.ball_mm / self.pitch_mm * math.cos(math.radians(self.contact_deg))
        return {
            "bpfo": self.balls / 2 * shaft_hz * (1 - r),
            "bpfi": self.balls / 2 * shaft_hz * (1 + r),
            "bsf": self.pitch_mm / (2 * self.ball_mm) * shaft_hz * (1 - r * r),
            "ftf": shaft_hz / 2 * (1 - r),
        }


@dataclass(frozen=True)
class AssetModel:
    """Nominal operating point of an asset type (the keys are `catalog` states)."""

    bearing_temp_rise: float  # above ambient when running, healthy
    aux_temp: float
    pressure: float
    current: float
    load: float
    speed_rpm: float
    rate: float
    vib_1x: float = 0.15  # g
    vib_2x: float = 0.05
    noise: float = 0.05
    resonance_hz: float = 3000.0
    bearing: Bearing = field(default_factory=Bearing)


MODELS: Final[dict[str, AssetModel]] = {
    "press": AssetModel(
        bearing_temp_rise=30.0,
        aux_temp=45.0,
        pressure=210.0,
        current=85.0,
        load=250.0,
        speed_rpm=1480.0,
        rate=30.0,
    ),
    "robot": AssetModel(
        bearing_temp_rise=20.0,
        aux_temp=35.0,
        pressure=6.0,
        current=12.0,
        load=40.0,
        speed_rpm=2400.0,
        rate=12.0,
        vib_1x=0.08,
        vib_2x=0.04,
        noise=0.03,
        resonance_hz=2500.0,
    ),
    "conveyor": AssetModel(
        bearing_temp_rise=15.0,
        aux_temp=55.0,
        pressure=12.0,
        current=22.0,
        load=600.0,
        speed_rpm=1450.0,
        rate=30.0,
        vib_1x=0.10,
        vib_2x=0.03,
        noise=0.04,
        resonance_hz=3500.0,
    ),
}


@dataclass
class Fault:
    kind: str
    severity: float
    ramp_s: float
    started_s: float
    tag: str = "bearing_temp"
    """The state a sensor fault affects."""
    frozen: float | None = None

    def level(self, now_s: float) -> float:
        """Severity now: ramps linearly from 0 to ``severity`` over ``ramp_s``."""
        if self.ramp_s <= 0:
            return self.severity
        return self.severity * min(1.0, max(0.0, (now_s - self.started_s) / self.ramp_s))


@dataclass(frozen=True)
class Production:
    """What stops a machine and spoils its parts (simulated seconds from the machine's
    start), for OEE: planned stops (``run_state`` false, on the plant's shift calendar),
    breakdowns (``run_state`` false, unplanned), micro-stops (``run_state`` true but no
    strokes: a performance loss) and scrap (a share of the strokes, on ``scrap_count``)."""

    planned_stops: tuple[tuple[float, float], ...] = ()
    """(start_s, duration_s) of each planned stop."""
    planned_every_s: float = 0.0
    """> 0: the planned stops repeat with this period (their starts within it)."""
    breakdowns_per_h: float = 0.0
    breakdown_s: float = 300.0
    micro_stops_per_h: float = 0.0
    micro_stop_s: float = 20.0
    scrap_rate: float = 0.0

    def planned(self, now_s: float) -> bool:
        t = now_s % self.planned_every_s if self.planned_every_s > 0 else now_s
        return any(start <= t < start + length for start, length in self.planned_stops)


@dataclass
class Truth:
    """What the machine really did (simulated seconds and strokes), from its start: the
    ground truth an OEE computed from its tags is compared with."""

    planned_stop_s: float = 0.0
    run_s: float = 0.0
    """Running (``run_state`` true), micro-stops included."""
    down_s: float = 0.0
    """Stopped outside planned stops (breakdowns)."""
    micro_stop_s: float = 0.0
    count: int = 0
    scrap: int = 0


COUNTER_MODULUS: Final = 2**32
"""The counters are uint32 tags: they roll over to 0."""

Reading = tuple[float | int | bool, str | None]
"""A value and, when it is not good, the OPC UA status name of why."""


class Machine:
    """One simulated machine: call `step` with simulated seconds, read `readings`."""

    def __init__(
        self,
        asset: str,
        seed: int,
        *,
        rate_hz: float = 10_000.0,
        production: Production | None = None,
    ) -> None:
        if asset not in MODELS:
            raise ValueError(f"unknown asset type {asset!r}; known: {', '.join(MODELS)}")
        self.asset = asset
        self.model = MODELS[asset]
        self.rng = np.random.default_rng(seed)
        self.rate_hz = rate_hz
        self.now_s = 0.0
        self.running = True
        self.faults: dict[str, Fault] = {}
        m = self.model
        self.bearing_temp = AMBIENT_C + m.bearing_temp_rise
        self.aux_temp = m.aux_temp
        self.count = 0.0
        self.scrap = 0
        self.production = production or Production()
        self.truth = Truth()
        self.producing = True
        """False during a micro-stop (running, but no strokes)."""
        self._until = 0.0
        """The end of the current breakdown or micro-stop."""
        self._broken = False
        # its own generator: the process signals stay those of a seed without production
        self._ops = np.random.default_rng(seed + 7_919)
        self.values: dict[str, float | int | bool] = {}
        # vibration generator state, continuous across blocks
        self._vib_t = 0.0
        self._angle = 0.0
        self._next_impact = 0.0
        self._tail = np.zeros(0)
        n = int(0.02 * rate_hz)  # 20 ms of ringing is plenty at 2% damping
        k = np.arange(n) / rate_hz
        wn = 2 * math.pi * m.resonance_hz
        zeta = 0.02
        self._ring = np.exp(-zeta * wn * k) * np.sin(wn * math.sqrt(1 - zeta**2) * k)
        self.step(0.0)

    # ---- faults ---------------------------------------------------------------------

    def inject(
        self, kind: str, severity: float = 1.0, ramp_s: float = 0.0, tag: str = "bearing_temp"
    ) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= severity <= 1.0:
            raise ValueError(f"severity must be within 0..1, got {severity}")
        fault = Fault(kind, severity, max(0.0, ramp_s), self.now_s, tag)
        if kind == "stuck_sensor":
            fault.frozen = float(self.values.get(tag, 0.0))
        self.faults[kind] = fault
        return fault

    def clear(self, kind: str | None = None) -> list[str]:
        cleared = [kind] if kind and kind in self.faults else [] if kind else list(self.faults)
        for k in cleared:
            del self.faults[k]
        return cleared

    def level(self, kind: str) -> float:
        fault = self.faults.get(kind)
        return fault.level(self.now_s) if fault else 0.0

    @property
    def dropped_out(self) -> bool:
        return "dropout" in self.faults

    # ---- slow process values ---------------------------------------------------------

    @property
    def shaft_hz(self) -> float:
        return float(self.values.get("speed", 0.0)) / 60.0

    def step(self, dt_s: float) -> None:
        """Advance the process by ``dt_s`` simulated seconds."""
        self.now_s += dt_s
        m, rng = self.model, self.rng
        wear = self.level("bearing_wear")
        leak = self.level("hydraulic_leak")
        run = 1.0 if self.running else 0.0
        target = AMBIENT_C + run * (m.bearing_temp_rise + 35.0 * wear)
        self.bearing_temp += (target - self.bearing_temp) * (1 - math.exp(-dt_s / 300.0))
        aux_target = AMBIENT_C + run * (m.aux_temp - AMBIENT_C + 12.0 * leak)
        self.aux_temp += (aux_target - self.aux_temp) * (1 - math.exp(-dt_s / 600.0))
        rate = run * m.rate * (1 + rng.normal(0, 0.003))
        before = int(self.count)
        self.count += rate / 60.0 * (dt_s if self.producing else 0.0)
        self._account(dt_s, int(self.count) - before)
        current = run * m.current * (1 + 0.35 * leak + 0.08 * wear) * (1 + rng.normal(0, 0.01))
        self.values = {
            "bearing_temp": round(self.bearing_temp + rng.normal(0, 0.05), 3),
            "aux_temp": round(self.aux_temp + rng.normal(0, 0.05), 3),
            "pressure": round(run * m.pressure * (1 - 0.25 * leak) * (1 + rng.normal(0, 0.004)), 2),
            "current": round(current, 1),
            "load": round(run * m.load * (1 - 0.12 * leak) * (1 + rng.normal(0, 0.01)), 1),
            "speed": round(run * m.speed_rpm * (1 + rng.normal(0, 0.001))),
            "rate": round(rate, 1),
            "count": int(self.count) % COUNTER_MODULUS,
            "scrap": self.scrap % COUNTER_MODULUS,
            "running": self.running,
            "overload": current > 1.25 * m.current,
        }

    @property
    def ideal_cycle_s(self) -> float:
        """Seconds per stroke at the nominal rate."""
        return 60.0 / self.model.rate

    def _account(self, dt_s: float, strokes: int) -> None:
        """Book the step just taken (in the state it was taken in) in the truth, then set
        the state of the next one from the production plan."""
        p, t = self.production, self.truth
        if p.planned(self.now_s - dt_s):
            t.planned_stop_s += dt_s
        elif not self.running:
            t.down_s += dt_s
        else:
            t.run_s += dt_s
            if not self.producing:
                t.micro_stop_s += dt_s
        if strokes > 0:
            t.count += strokes
            if p.scrap_rate > 0:
                scrapped = int(self._ops.binomial(strokes, p.scrap_rate))
                self.scrap += scrapped
                t.scrap += scrapped
        if dt_s <= 0:
            return
        now = self.now_s
        if self._broken and now >= self._until:
            self._broken = False
        if not self.producing and now >= self._until:
            self.producing = True
        planned = p.planned(now)
        if not planned and not self._broken and self._draw(p.breakdowns_per_h, dt_s):
            self._broken, self._until = True, now + p.breakdown_s
        idle = planned or self._broken or not self.producing
        if not idle and self._draw(p.micro_stops_per_h, dt_s):
            self.producing, self._until = False, now + p.micro_stop_s
        self.running = not planned and not self._broken

    def _draw(self, per_h: float, dt_s: float) -> bool:
        """Whether a Poisson process of ``per_h`` fires within ``dt_s``."""
        return per_h > 0 and bool(self._ops.random() < 1 - math.exp(-per_h * dt_s / 3600))

    def readings(self) -> dict[str, Reading]:
        """What the sensors report: process values with sensor faults and dropouts applied."""
        if self.dropped_out:
            return {k: (v, "BadCommunicationError") for k, v in self.values.items()}
        out: dict[str, Reading] = {k: (v, None) for k, v in self.values.items()}
        drift = self.faults.get("sensor_drift")
        if drift and drift.tag in out:
            value = float(out[drift.tag][0])
            out[drift.tag] = (round(value + 15.0 * drift.level(self.now_s), 3), None)
        stuck = self.faults.get("stuck_sensor")
        if stuck and stuck.tag in out and stuck.frozen is not None:
            out[stuck.tag] = (stuck.frozen, None)
        return out

    # ---- vibration ---------------------------------------------------------------------

    def vibration(self, n: int) -> np.ndarray:
        """The next ``n`` samples of drive-end acceleration (g, float32), continuous."""
        m, rng, fs = self.model, self.rng, self.rate_hz
        f = self.shaft_hz
        # the shaft's angle is integrated, so a speed change never jumps the phase
        angle = self._angle + 2 * np.pi * f * np.arange(n) / fs
        self._angle = (self._angle + 2 * np.pi * f * n / fs) % (2 * np.pi)
        x = (
            m.vib_1x * np.sin(angle)
            + m.vib_2x * np.sin(2 * angle + 0.3)
            + rng.normal(0.0, m.noise, n)
        )
        wear = self.level("bearing_wear")
        impulses = np.zeros(n + len(self._ring))
        if wear > 0 and f > 0:
            bpfo = m.bearing.frequencies(f)["bpfo"]
            end = self._vib_t + n / fs
            if self._next_impact < self._vib_t:
                self._next_impact = self._vib_t
            while self._next_impact < end:
                i = int((self._next_impact - self._vib_t) * fs)
                impulses[i] += 3.0 * wear * (1 + rng.normal(0, 0.1))
                self._next_impact += (1 / bpfo) * (1 + rng.normal(0, 0.01))  # slip
            x += rng.normal(0.0, m.noise * 2 * wear, n)
        rung = np.convolve(impulses[:n], self._ring)
        if len(self._tail):
            rung[: len(self._tail)] += self._tail
        x += rung[:n]
        self._tail = rung[n:]
        self._vib_t += n / fs
        out: np.ndarray = x.astype(np.float32)
        return out
