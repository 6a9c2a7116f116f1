"""``uns run modbus-adapter``: Modbus TCP units published as ISA-95 devices.

Polls one Modbus TCP endpoint (a PLC or a gateway with several unit ids) per
poll group, decodes registers (16/32/64-bit integers and floats in any word and
byte order, bit fields, coils, scale and offset) and publishes each unit as a
device on ``<path>/raw/{birth,data,death}``: births first, then only changed
values (report by exception with a deadband and a heartbeat), quality ``bad``
with the reason when a read fails, a device death after ``max_failures`` failed
polls or when the connection is lost, and births again when it comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_modbus_adapter.service import ModbusAdapter
    from uns_modbus_adapter.settings import ModbusAdapterSettings, ModbusDevice, Register

__all__ = [
    "ModbusAdapter",
    "ModbusAdapterSettings",
    "ModbusDevice",
    "Register",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ModbusAdapter": "service",
        "ModbusAdapterSettings": "settings",
        "ModbusDevice": "settings",
        "Register": "settings",
    },
)
