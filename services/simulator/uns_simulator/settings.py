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
