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
        MODBUS_ASSETS,
        NAMESPACE_URI,
        adapter_config,
        opcua_node_id,
        opcua_object,
        scaled_plant,
    )
    from uns_simulator.opcua_server import OpcUaSim
    from uns_simulator.physics import Machine
    from uns_simulator.service import Simulator
    from uns_simulator.settings import SimulatorSettings

__all__ = [
    "ASSETS",
    "FAULT_EVENT",
    "FAULT_KINDS",
    "MODBUS_ASSETS",
    "NAMESPACE_URI",
    "Machine",
    "OpcUaSim",
    "Simulator",
    "SimulatorSettings",
    "adapter_config",
    "opcua_node_id",
    "opcua_object",
    "scaled_plant",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ASSETS": "catalog",
        "FAULT_EVENT": "catalog",
        "FAULT_KINDS": "catalog",
        "MODBUS_ASSETS": "catalog",
        "NAMESPACE_URI": "catalog",
        "Machine": "physics",
        "OpcUaSim": "opcua_server",
        "Simulator": "service",
        "SimulatorSettings": "settings",
        "adapter_config": "catalog",
        "opcua_node_id": "catalog",
        "opcua_object": "catalog",
        "scaled_plant": "catalog",
    },
)
