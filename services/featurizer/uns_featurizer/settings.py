from typing import Annotated

import msgspec

from uns import ServiceSettings
from uns.config import Strict


class WaveformSettings(Strict, frozen=True):
    window: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 10_000
    """Samples per window (1 s at 10 kHz)."""
    hop: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] | None = None
    """Samples between window starts; the window length (no overlap) when absent."""
    bands: tuple[tuple[float, float], ...] = ((10.0, 1000.0), (1000.0, 2500.0), (2500.0, 5000.0))
    """Frequency bands (Hz) whose energy is a feature ``band_<lo>_<hi>``."""
    envelope_band: tuple[float, float] = (1000.0, 4500.0)
    """Band (Hz) demodulated for the envelope spectrum: around the structural resonance."""

    def __post_init__(self) -> None:
        for lo, hi in [*self.bands, self.envelope_band]:
            if not 0 <= lo < hi:
                raise ValueError(f"band ({lo}, {hi}): need 0 <= low < high")


class SlowSettings(Strict, frozen=True):
    window_s: Annotated[float, msgspec.Meta(ge=0.001)] = 60.0
    hop_s: Annotated[float, msgspec.Meta(ge=0.001)] = 10.0
    """Windows are kept in whole milliseconds: at least 0.001 s."""
    stagger: bool = True
    """Spread the devices' window ends over the hop: each device's windows end at a fixed
    offset from its path, so a thousand devices do not close theirs in the same
    millisecond (a burst that delays every vibration window behind it). false: every
    device's windows end on multiples of hop_s."""


class Bearing(Strict, frozen=True):
    balls: Annotated[int, msgspec.Meta(ge=3)] = 9
    ball_mm: Annotated[float, msgspec.Meta(gt=0)] = 7.94
    pitch_mm: Annotated[float, msgspec.Meta(gt=0)] = 39.04
    contact_deg: float = 0.0


class FeaturizerSettings(ServiceSettings, frozen=True):
    waveform: WaveformSettings = WaveformSettings()
    slow: SlowSettings = SlowSettings()
    speed_tags: tuple[str, ...] = ("motor_speed",)
    """Slow tags giving the shaft speed in rpm (for the bearing defect frequencies)."""
    bearing: Bearing = Bearing()
    """Geometry of the monitored bearing (default: a 6205)."""
    bearings: dict[str, Bearing] = {}
    """Per asset type (``plant.devices[].asset``), overriding ``bearing``."""
    ignore: tuple[str, ...] = ("run_state", "overload")
    """Slow tags not worth features (states, counters you do not want trended)."""
