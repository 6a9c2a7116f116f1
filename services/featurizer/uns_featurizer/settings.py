from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import Strict, UnsConfig
from uns.scope import Scope


class WaveformSettings(Strict, frozen=True):
    window: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 10_000
    """Samples per window (1 s at 10 kHz)."""
    hop: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] | None = None
    """Samples between window starts; the window length (no overlap) when absent."""
    bands: tuple[tuple[float, float], ...] = ((10.0, 1000.0), (1000.0, 2500.0), (2500.0, 5000.0))
    """Frequency bands (Hz) whose energy is a feature ``band_<lo>_<hi>``."""
    envelope_band: tuple[float, float] = (1000.0, 4500.0)
    """Band (Hz) demodulated for the envelope spectrum: around the structural resonance."""
    min_rate_hz: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_rate_hz: Annotated[float, msgspec.Meta(gt=0, le=1e9)] = 1_000_000.0
    """Blocks whose ``rate_hz`` is outside these are refused (``reason="rate"``): a rate of
    0, a negative one or 1e12 would divide by zero or put a window's end past any date."""
    max_block: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    """Samples in one block at most (10 s at 10 kHz); a bigger block is refused
    (``reason="samples"``) rather than turned into thousands of windows in one go."""

    def __post_init__(self) -> None:
        for lo, hi in [*self.bands, self.envelope_band]:
            if not 0 <= lo < hi:
                raise ValueError(f"band ({lo}, {hi}): need 0 <= low < high")
        if self.min_rate_hz > self.max_rate_hz:
            raise ValueError("min_rate_hz is above max_rate_hz")


class SlowSettings(Strict, frozen=True):
    window_s: Annotated[float, msgspec.Meta(ge=0.001)] = 60.0
    hop_s: Annotated[float, msgspec.Meta(ge=0.001)] = 10.0
    """Windows are kept in whole milliseconds: at least 0.001 s."""
    stagger: bool = True
    """Spread the devices' window ends over the hop: each device's windows end at a fixed
    offset from its path, so a thousand devices do not close theirs in the same
    millisecond (a burst that delays every vibration window behind it). false: every
    device's windows end on multiples of hop_s."""


class TimestampSettings(Strict, frozen=True):
    """What a raw sample's timestamp may be (``reason="timestamp"`` otherwise): one forged
    or garbled stamp must neither stall a tag's windows nor move them years away."""

    max_future_s: Annotated[float, msgspec.Meta(ge=0, le=31_536_000)] = 300.0
    """Samples stamped further ahead of this box's clock are refused."""
    max_past_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Samples stamped further behind it are refused; none: anything since 2000-01-01 is
    taken (replays of old recordings)."""
    max_jump_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """A sample this much further from its tag's last one than the box's clock moved
    meanwhile is held, not windowed, until ``resync_after`` samples in a row agree on the
    new time (a replayed file's own gap, a clock set right): then windowing restarts there."""
    resync_after: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3


class Bearing(Strict, frozen=True):
    balls: Annotated[int, msgspec.Meta(ge=3)] = 9
    ball_mm: Annotated[float, msgspec.Meta(gt=0)] = 7.94
    pitch_mm: Annotated[float, msgspec.Meta(gt=0)] = 39.04
    contact_deg: float = 0.0


class FeaturizerSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9405

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
    timestamps: TimestampSettings = TimestampSettings()
    max_devices: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """Devices windowed at most: raw data of more is refused (``reason="too_many_devices"``),
    so a flood of made-up device paths cannot take the memory."""
    max_signals: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    """Signals (waveforms and slow tags) windowed per device at most; more are excluded
    (``reason="too_many_signals"``)."""

    def scope(self, config: UnsConfig) -> Scope:
        """Reads every device's raw stream; publishes features of this site's devices."""
        ns = config.namespace
        return Scope(
            publish=(f"{ns.enterprise}/{ns.site}/+/+/+/+/features/+",),
            subscribe=tuple(f"+/+/+/+/+/+/raw/{m}" for m in ("birth", "data", "death")),
        )
