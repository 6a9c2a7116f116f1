"""``uns run simulator``: the plant when no plant is attached.

A real OPC UA server (asyncua) and a real Modbus TCP server (pymodbus) expose
every machine of ``plant.devices`` whose asset type is simulated (press, robot,
conveyor): a 10 kHz vibration waveform (OPC UA Float array, one block per write)
and ten slow tags on both protocols, with physically plausible signals,
deterministic for a seed. Faults are injected through the namespace
(``{device}/cmd/fault``, ``{device}/cmd/clear``) or ``uns sim fault``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_simulator.catalog import (
        ASSETS,
        FAULT_EVENT,
        FAULT_KINDS,
        adapter_config,
        opcua_node_id,
        scaled_plant,
    )
    from uns_simulator.physics import Machine
    from uns_simulator.service import Simulator
    from uns_simulator.settings import SimulatorSettings

__all__ = [
    "ASSETS",
    "FAULT_EVENT",
    "FAULT_KINDS",
    "Machine",
    "Simulator",
    "SimulatorSettings",
    "adapter_config",
    "opcua_node_id",
    "scaled_plant",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ASSETS": "catalog",
        "FAULT_EVENT": "catalog",
        "FAULT_KINDS": "catalog",
        "Machine": "physics",
        "Simulator": "service",
        "SimulatorSettings": "settings",
        "adapter_config": "catalog",
        "opcua_node_id": "catalog",
        "scaled_plant": "catalog",
    },
)
