"""What each asset type exposes, and where: tag names, units, ranges, OPC UA NodeIds, Modbus map.

Pure data, shared by the simulator's servers and by `uns sim tagmap`, which writes
the adapter configuration that reads them. Every asset has a vibration waveform
(OPC UA array) and ten slow tags, each on OPC UA and on Modbus TCP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from uns import DevicePath

Table = Literal["coil", "discrete", "input", "holding"]
NAMESPACE_URI = "urn:uns:simulator"

FAULT_KINDS: Final = ("bearing_wear", "hydraulic_leak", "sensor_drift", "stuck_sensor", "dropout")
"""The faults a machine model takes (`uns sim fault`, ``{device}/cmd/fault``)."""
FAULT_EVENT: Final = "sim_fault"
"""The event stream of injected faults: ``{device}/events/sim_fault``."""


@dataclass(frozen=True)
class Register:
    table: Table
    address: int
    type: str = "uint16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0


@dataclass(frozen=True)
class Tag:
    name: str
    state: str
    """The physical quantity of the machine model it reads (see physics.Machine)."""
    datatype: str
    unit: str
    low: float | None
    high: float | None
    description: str
    register: Register


def _tags(names: dict[str, tuple[str, str, float | None, float | None, str]]) -> list[Tag]:
    """Ten slow tags (the press: eleven, with its scrap counter) in one Modbus layout shared
    by every asset type; names differ by asset."""
    layout = {
        "bearing_temp": ("float", Register("holding", 0, "float32", "big")),
        "aux_temp": ("float", Register("holding", 2, "float32", "little")),
        "pressure": ("float", Register("holding", 4, "float32", "little")),
        "current": ("float", Register("input", 0, "int16", scale=0.1)),
        "load": ("float", Register("input", 1, "int16", scale=0.1)),
        "speed": ("float", Register("input", 2, "uint16")),
        "rate": ("float", Register("input", 3, "uint16", scale=0.1)),
        "count": ("uint32", Register("holding", 6, "uint32", "big")),
        "running": ("bool", Register("coil", 0, "bool")),
        "overload": ("bool", Register("discrete", 0, "bool")),
        "scrap": ("uint32", Register("holding", 8, "uint32", "big")),  # where it has one
    }
    out = []
    for state, (datatype, register) in layout.items():
        if state not in names:
            continue
        name, unit, low, high, description = names[state]
        out.append(Tag(name, state, datatype, unit, low, high, description, register))
    return out


ASSETS: dict[str, list[Tag]] = {
    "press": _tags(
        {
            "bearing_temp": ("bearing_temp", "degC", -20, 150, "Main drive bearing temperature"),
            "aux_temp": ("oil_temp", "degC", -20, 120, "Hydraulic oil temperature"),
            "pressure": ("hydraulic_pressure", "bar", 0, 350, "Main cylinder pressure"),
            "current": ("motor_current", "A", 0, 300, "Main motor current"),
            "load": ("ram_tonnage", "t", 0, 400, "Peak ram force of the last stroke"),
            "speed": ("motor_speed", "rpm", 0, 1800, "Main motor speed"),
            "rate": ("stroke_rate", "1/min", 0, 60, "Strokes per minute"),
            "count": ("stroke_count", "1", 0, 4294967295, "Strokes since commissioning"),
            "running": ("run_state", "", None, None, "Press running"),
            "overload": ("overload", "", None, None, "Overload relay tripped"),
            "scrap": ("scrap_count", "1", 0, 4294967295, "Parts scrapped since commissioning"),
        }
    ),
    "robot": _tags(
        {
            "bearing_temp": ("gearbox_temp", "degC", -20, 150, "Axis 1 gearbox temperature"),
            "aux_temp": ("cabinet_temp", "degC", -20, 80, "Controller cabinet temperature"),
            "pressure": ("air_pressure", "bar", 0, 10, "Gripper air pressure"),
            "current": ("motor_current", "A", 0, 60, "Axis 1 motor current"),
            "load": ("payload", "kg", 0, 200, "Payload of the last cycle"),
            "speed": ("motor_speed", "rpm", 0, 3000, "Axis 1 motor speed"),
            "rate": ("cycle_rate", "1/min", 0, 60, "Weld cycles per minute"),
            "count": ("cycle_count", "1", 0, 4294967295, "Cycles since commissioning"),
            "running": ("run_state", "", None, None, "Robot in automatic"),
            "overload": ("overload", "", None, None, "Axis overload"),
        }
    ),
    "conveyor": _tags(
        {
            "bearing_temp": ("bearing_temp", "degC", -20, 150, "Drive pulley bearing temperature"),
            "aux_temp": ("motor_temp", "degC", -20, 150, "Drive motor winding temperature"),
            "pressure": ("belt_tension", "kN", 0, 50, "Belt tension"),
            "current": ("motor_current", "A", 0, 100, "Drive motor current"),
            "load": ("belt_load", "kg", 0, 2000, "Load on the belt"),
            "speed": ("motor_speed", "rpm", 0, 1800, "Drive motor speed"),
            "rate": ("belt_speed", "m/min", 0, 60, "Belt speed"),
            "count": ("item_count", "1", 0, 4294967295, "Parts transported"),
            "running": ("run_state", "", None, None, "Conveyor running"),
            "overload": ("overload", "", None, None, "Motor overload"),
        }
    ),
}

VIBRATION = "vibration"
MODBUS_ASSETS = ("robot",)
"""Asset types whose controllers the example plant reads over Modbus TCP (the rest: OPC UA)."""


def opcua_object(path: DevicePath) -> str:
    """The string identifier of a machine's OPC UA object: ``stamping.line-3.cell-a.press-01``."""
    return f"{path.area}.{path.line}.{path.cell}.{path.device}"


def opcua_node_id(path: DevicePath, tag: str, ns: int = 2) -> str:
    """``ns=2;s=stamping.line-3.cell-a.press-01.bearing_temp``: unique per plant and readable."""
    return f"ns={ns};s={opcua_object(path)}.{tag}"


def adapter_config(
    devices: list[tuple[DevicePath, str]],
    *,
    opcua_url: str,
    modbus_host: str,
    modbus_port: int,
    rate_hz: float,
    modbus_assets: tuple[str, ...] = MODBUS_ASSETS,
) -> dict[str, Any]:
    """The ``services.opcua-adapter`` and ``services.modbus-adapter`` sections that read this
    simulator: templates per asset type, one entry per device.

    A device belongs to one edge node (Sparkplug), so each machine is read over one
    protocol: ``modbus_assets`` over Modbus TCP (slow tags only), the rest over OPC UA
    (vibration and slow tags). The simulator serves both protocols for every machine;
    Modbus unit ids follow the order of ``devices`` from 1.
    """
    units = {p: i + 1 for i, (p, _) in enumerate(devices)}
    ua_devices = [(p, a) for p, a in devices if a not in modbus_assets]
    mb_devices = [(p, a) for p, a in devices if a in modbus_assets]
    ua_templates = {
        asset: [
            {
                "name": VIBRATION,
                "node": "{prefix}." + VIBRATION,
                "datatype": "waveform",
                "unit": "g",
                "low": -50.0,
                "high": 50.0,
                "rate_hz": rate_hz,
                "description": "Drive-end accelerometer",
            },
            *(
                {
                    "name": t.name,
                    "node": "{prefix}." + t.name,
                    "datatype": t.datatype,
                    "unit": t.unit,
                    **({"low": t.low, "high": t.high} if t.low is not None else {}),
                    "description": t.description,
                }
                for t in ASSETS[asset]
            ),
        ]
        for asset in sorted({a for _, a in ua_devices})
    }
    mb_templates = {
        asset: [
            {
                "name": t.name,
                "table": t.register.table,
                "address": t.register.address,
                "type": t.register.type,
                "word_order": t.register.word_order,
                "scale": t.register.scale,
                "unit": t.unit,
                "description": t.description,
                "group": "fast" if t.state in ("running", "overload", "current") else "slow",
            }
            for t in ASSETS[asset]
        ]
        for asset in sorted({a for _, a in mb_devices})
    }
    return {
        "opcua-adapter": {
            "url": opcua_url,
            "templates": ua_templates,
            "devices": [
                {"path": str(p), "template": a, "prefix": f"ns=2;s={opcua_object(p)}"}
                for p, a in ua_devices
            ],
        },
        "modbus-adapter": {
            "host": modbus_host,
            "port": modbus_port,
            "templates": mb_templates,
            "devices": [
                {"path": str(p), "template": a, "unit_id": units[p]} for p, a in mb_devices
            ],
        },
    }


def scaled_plant(
    machines: int, *, enterprise: str = "acme", site: str = "pune", per_line: int = 6
) -> list[tuple[DevicePath, str]]:
    """``machines`` machines in the example plant's mix (4 presses, a robot, a conveyor per
    line of six), on lines ``line-1``, ``line-2``, ... of area ``stamping``."""
    mix = ["press", "press", "press", "press", "robot", "conveyor"]
    out: list[tuple[DevicePath, str]] = []
    for i in range(machines):
        line, slot = divmod(i, per_line)
        asset = mix[slot % len(mix)]
        cell = "cell-a" if asset == "press" else "cell-b"
        n = sum(1 for _, a in out[line * per_line :] if a == asset) + 1
        out.append(
            (
                DevicePath(
                    enterprise, site, "stamping", f"line-{line + 1}", cell, f"{asset}-{n:02d}"
                ),
                asset,
            )
        )
    return out
