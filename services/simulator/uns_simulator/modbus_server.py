"""The simulator's Modbus TCP server (the only module importing pymodbus)."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from uns.errors import ConfigError
from uns_simulator.catalog import Register

log = logging.getLogger(__name__)

_FC = {"coil": 5, "discrete": 2, "holding": 16, "input": 4}
SIZE = 64  # registers (and bits) per table per unit


def encode(value: float | int | bool, reg: Register) -> list[int]:
    """A value as the register words (or one bit) the catalog says it is stored as."""
    if reg.type == "bool":
        return [bool(value)]  # type: ignore[list-item]
    raw = round(float(value) / reg.scale) if reg.scale != 1.0 else value
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}[reg.type]
    if fmt in (">h", ">H", ">i", ">I"):
        raw = int(raw)
        if fmt == ">h":
            raw = max(-32768, min(32767, raw))
        elif fmt == ">H":
            raw = max(0, min(65535, raw))
    data = struct.pack(fmt, raw)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if reg.word_order == "little" else words


class ModbusSim:
    """Serves one unit id per machine; `dropout` makes a unit answer with exception 0x0B."""

    def __init__(
        self, units: list[int], host: str, port: int, failing: Callable[[int], bool]
    ) -> None:
        self.host, self.port = host, port
        self._failing = failing

        def action(unit: int) -> Any:
            async def check(
                _fc: int, _start: int, _address: int, _count: int, _registers: Any, values: Any
            ) -> ExcCodes | None:
                if values is None and self._failing(unit):  # reads only: our own writes go on
                    return ExcCodes.GATEWAY_NO_RESPONSE
                return None

            return check

        devices = [
            SimDevice(
                id=unit,
                simdata=(
                    [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)],
                    [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)],
                ),
                action=action(unit),
            )
            for unit in units
        ]
        self.server = ModbusTcpServer(devices, address=(host, port))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve_forever())
        while not self.server.is_active():
            if self._task.done():
                try:
                    self._task.result()
                except (OSError, RuntimeError) as exc:  # pymodbus: "Could not start listen"
                    raise ConfigError(
                        f"simulator.modbus.port: cannot listen on {self.host}:{self.port}"
                        " (in use by another program, or not an address of this machine)"
                    ) from exc
            await asyncio.sleep(0.01)
        log.info("Modbus TCP on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        await self.server.shutdown()  # type: ignore[no-untyped-call]
        if self._task is not None:
            await self._task

    async def write(self, unit: int, reg: Register, value: float | int | bool) -> None:
        await self.server.async_setValues(unit, _FC[reg.table], reg.address, encode(value, reg))
