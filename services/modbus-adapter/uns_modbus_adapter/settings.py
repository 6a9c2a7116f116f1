"""Settings of the Modbus TCP adapter, validated before anything connects.

Every error names the entry it is about, e.g.
``devices[2] (acme/pune/stamping/line-3/cell-a/press-03): registers 'bearing_temp'
(holding 0-1) and 'pressure' (holding 1-2) overlap``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Final, Literal

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText, Port, PositiveFloat, Slug, Strict, UnsConfig
from uns.scope import Scope, devices_scope

Table = Literal["coil", "discrete", "input", "holding"]
RegisterType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32", "float64", "bit"]
Order = Literal["big", "little"]

BIT_TABLES: Final = frozenset({"coil", "discrete"})
WORDS: Final[dict[str, int]] = {
    "bool": 1,
    "bit": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
}
MAX_ADDRESS: Final = 65535


class Register(Strict, frozen=True):
    """One value of a device: where it lives, how to decode it, what it means."""

    name: Slug
    """Metric name, unique within the device."""
    table: Table
    address: Annotated[int, msgspec.Meta(ge=0, le=MAX_ADDRESS)]
    """0-based protocol address (holding register 40001 is address 0)."""
    type: RegisterType | None = None
    """When absent: ``uint16`` on input/holding registers, ``bool`` on coils/discretes.
    ``bit`` is one bit (``bit``) of a 16-bit register; ``bool`` is only for coils/discretes."""
    bit: Annotated[int, msgspec.Meta(ge=0, le=15)] | None = None
    """For ``type: bit``: which bit of the 16-bit register (0 = least significant)."""
    word_order: Order = "big"
    """Order of the 16-bit words of 32/64-bit values; ``little`` is CDAB."""
    byte_order: Order = "big"
    """Order of the bytes inside each word; ``little`` swaps them (BADC)."""
    scale: float = 1.0
    offset: float = 0.0
    """Engineering value = raw * scale + offset."""
    unit: str = ""
    low: float | None = None
    high: float | None = None
    description: str = ""
    deadband: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Absolute change needed before a new value is published (report by exception)."""
    group: Slug = "fast"
    """Poll group (a key of ``poll_groups``)."""

    def __post_init__(self) -> None:
        kind = self.kind
        if self.table in BIT_TABLES and kind != "bool":
            raise ValueError(
                f"register {self.name!r}: type {kind!r} on a {self.table}; "
                f"a {self.table} is a single bit, use type 'bool' (or leave type out)"
            )
        if self.table not in BIT_TABLES and kind == "bool":
            raise ValueError(
                f"register {self.name!r}: type 'bool' on a {self.table} register;"
                " use type 'bit' with 'bit: 0..15' for one bit of a register"
            )
        if kind == "bit" and self.bit is None:
            raise ValueError(f"register {self.name!r}: type 'bit' needs 'bit' (0..15)")
        if kind != "bit" and self.bit is not None:
            raise ValueError(f"register {self.name!r}: 'bit' is only for type 'bit'")
        if self.address + self.words - 1 > MAX_ADDRESS:
            raise ValueError(
                f"register {self.name!r}: {kind} at {self.address} runs past address {MAX_ADDRESS}"
            )
        if not (math.isfinite(self.scale) and self.scale != 0.0):
            raise ValueError(f"register {self.name!r}: scale must be a finite non-zero number")
        if not math.isfinite(self.offset):
            raise ValueError(f"register {self.name!r}: offset must be finite")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"register {self.name!r}: low {self.low} > high {self.high}")

    @property
    def kind(self) -> RegisterType:
        """The effective type."""
        if self.type is not None:
            return self.type
        return "bool" if self.table in BIT_TABLES else "uint16"

    @property
    def words(self) -> int:
        """Registers (or bits, on coils/discretes) it occupies."""
        return WORDS[self.kind]

    @property
    def end(self) -> int:
        """Last address it occupies."""
        return self.address + self.words - 1

    def span(self) -> str:
        """``holding 0-1`` / ``coil 3`` / ``holding 7.3`` for messages."""
        if self.kind == "bit":
            return f"{self.table} {self.address}.{self.bit}"
        if self.words == 1:
            return f"{self.table} {self.address}"
        return f"{self.table} {self.address}-{self.end}"


class ModbusDevice(Strict, frozen=True):
    """One Modbus unit published as one device of the namespace."""

    path: DevicePathText
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=247)]
    template: str | None = None
    """Name of a register list in ``templates``, applied before ``registers``."""
    registers: list[Register] = []


def check_registers(registers: list[Register]) -> None:
    """Raise ValueError on duplicate names or overlapping registers of one unit."""
    seen: set[str] = set()
    for reg in registers:
        if reg.name in seen:
            raise ValueError(f"register name {reg.name!r} is used twice")
        seen.add(reg.name)
    by_table: dict[str, list[Register]] = {}
    for reg in registers:
        by_table.setdefault(reg.table, []).append(reg)
    for regs in by_table.values():
        regs.sort(key=lambda r: (r.address, r.end))
        for i, a in enumerate(regs):
            for b in regs[i + 1 :]:
                if b.address > a.end:
                    break
                if a.kind == "bit" and b.kind == "bit" and a.bit != b.bit:
                    continue  # two bit fields of one register
                raise ValueError(
                    f"registers {a.name!r} ({a.span()}) and {b.name!r} ({b.span()}) overlap"
                )


class ModbusAdapterSettings(ServiceSettings, frozen=True):
    """``services.modbus-adapter``: one Modbus TCP endpoint (a PLC or a gateway) and its units."""

    default_metrics_port: ClassVar[int] = 9402

    host: str = "127.0.0.1"
    port: Port = 5020
    timeout_s: PositiveFloat = 1.0
    """Connect and response timeout of one request."""
    poll_groups: dict[Slug, float] = msgspec.field(
        default_factory=lambda: {"fast": 0.2, "slow": 1.0}
    )
    """Seconds between polls, per group."""
    heartbeat_s: PositiveFloat = 30.0
    """Every value is published at least this often, even unchanged."""
    max_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Consecutive failed polls of a device before its death is published."""
    max_block: Annotated[int, msgspec.Meta(ge=4, le=125)] = 100
    """Registers (or bits) per read request."""
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=125)] = 8
    """Unused registers a read may span to merge two ranges into one request."""
    templates: dict[str, list[Register]] = {}
    """Named register lists shared by many devices."""
    devices: list[ModbusDevice] = []

    def __post_init__(self) -> None:
        for group, interval in self.poll_groups.items():
            if not (math.isfinite(interval) and interval > 0):
                raise ValueError(f"poll_groups.{group}: interval must be > 0 s, got {interval}")
        for name, registers in self.templates.items():
            try:
                check_registers(list(registers))
                self._check_groups(registers)
            except ValueError as exc:
                raise ValueError(f"templates.{name}: {exc}") from None
        paths: dict[str, int] = {}
        units: dict[int, int] = {}
        for i, dev in enumerate(self.devices):
            where = f"devices[{i}] ({dev.path})"
            if dev.path in paths:
                raise ValueError(f"{where}: path already used by devices[{paths[dev.path]}]")
            paths[dev.path] = i
            if dev.unit_id in units:
                raise ValueError(
                    f"{where}: unit_id {dev.unit_id} already used by devices[{units[dev.unit_id]}]"
                )
            units[dev.unit_id] = i
            if dev.template is not None and dev.template not in self.templates:
                known = ", ".join(sorted(self.templates)) or "none defined"
                raise ValueError(f"{where}: unknown template {dev.template!r} (templates: {known})")
            try:
                registers = self.registers_of(dev)
                if not registers:
                    raise ValueError("no registers (give 'registers' or a 'template')")
                check_registers(registers)
                self._check_groups(registers)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None

    def _check_groups(self, registers: list[Register]) -> None:
        for reg in registers:
            if reg.group not in self.poll_groups:
                known = ", ".join(sorted(self.poll_groups)) or "none defined"
                raise ValueError(
                    f"register {reg.name!r}: unknown poll group {reg.group!r}"
                    f" (poll_groups: {known})"
                )

    def registers_of(self, device: ModbusDevice) -> list[Register]:
        """A device's registers: its template's, then its own."""
        base = self.templates.get(device.template, []) if device.template else []
        return [*base, *device.registers]

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes the raw stream of each device of its tag map, nothing else."""
        return Scope(publish=devices_scope([d.path for d in self.devices], "raw"))
