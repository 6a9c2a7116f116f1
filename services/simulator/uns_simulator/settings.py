from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText, FieldError, Port, Strict, UnsConfig
from uns.scope import Scope
from uns_simulator.catalog import FAULT_EVENT


class Endpoint(Strict, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    """Listen address; 0.0.0.0 to let other machines (a real adapter, a test client) in."""
    port: Port = 0


class PlannedStop(Strict, frozen=True):
    at_s: Annotated[float, msgspec.Meta(ge=0)]
    """Simulated seconds from the start (within ``planned_every_s`` when that is set)."""
    duration_s: Annotated[float, msgspec.Meta(gt=0)]


class Production(Strict, frozen=True):
    """Losses for OEE, the same for every simulated machine (each draws its own): none by
    default. Their ground truth is in the ``status`` node command's answer."""

    planned_stops: list[PlannedStop] = []
    """The machines stop (``run_state`` false): breaks, changeovers."""
    planned_every_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """> 0: the planned stops repeat with this period."""
    breakdowns_per_h: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Unplanned stops (``run_state`` false), at random."""
    breakdown_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    micro_stops_per_h: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Short stalls: ``run_state`` stays true but no stroke is counted."""
    micro_stop_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    scrap_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """The share of strokes scrapped (on ``scrap_count``, where the asset has it)."""


class SimulatorSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9403

    seed: int = 42
    """Same seed, same plant: every signal is deterministic for a seed and a step sequence."""
    time_scale: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 1.0
    """Simulated seconds per wall second for slow processes (heating, fault ramps)."""
    tick_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.2
    """Wall seconds between updates of the slow tags."""
    rate_hz: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 10_000.0
    """Vibration sample rate."""
    block: Annotated[int, msgspec.Meta(ge=16, le=100_000)] = 1000
    """Samples per waveform block (10 blocks/s at 10 kHz)."""
    opcua: Endpoint = Endpoint(port=4840)
    modbus: Endpoint = Endpoint(port=5020)
    production: Production = Production()
    """Planned stops, breakdowns, micro-stops and scrap (for OEE)."""
    devices: list[DevicePathText] | None = None
    """Which plant devices to simulate (paths); all of `plant.devices` when absent."""

    def check_config(self, config: UnsConfig) -> None:
        """A device to simulate must be one of the plant's: a typo would otherwise leave a
        machine silently unsimulated."""
        plant = {d.path for d in config.plant.devices}
        for i, path in enumerate(self.devices or []):
            if path not in plant:
                raise FieldError(f"devices[{i}]", f"{path!r} is not a device of plant.devices")

    def scope(self, config: UnsConfig) -> Scope:
        """Obeys ``cmd/fault`` and ``cmd/clear`` (of any device: its own ones are acted on);
        publishes the ground truth of a fault, ``events/sim_fault``, of each device it
        simulates."""
        paths = self.devices if self.devices is not None else [d.path for d in config.plant.devices]
        return Scope(
            publish=tuple(f"{path}/events/{FAULT_EVENT}" for path in paths),
            subscribe=("+/+/+/+/+/+/cmd/fault", "+/+/+/+/+/+/cmd/clear"),
        )
