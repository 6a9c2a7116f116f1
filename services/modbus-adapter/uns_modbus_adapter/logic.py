"""The adapter's pure logic: register decoding, read planning, report by exception. No I/O."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from uns import MetricDef
from uns.payloads import DataType
from uns_modbus_adapter.settings import Register, Table

Value = bool | int | float

_FORMATS: Final[dict[str, str]] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "float64": ">d",
}


def _swap(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _to_wire(words: Sequence[int], reg: Register) -> bytes:
    """Words as read from the device -> big-endian bytes of the value."""
    ws = [_swap(w) for w in words] if reg.byte_order == "little" else list(words)
    if reg.word_order == "little":
        ws.reverse()
    return b"".join(w.to_bytes(2, "big") for w in ws)


def _from_wire(data: bytes, reg: Register) -> list[int]:
    ws = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if reg.word_order == "little":
        ws.reverse()
    return [_swap(w) for w in ws] if reg.byte_order == "little" else ws


def decode_raw(words: Sequence[int], reg: Register) -> Value:
    """The raw value of ``reg`` from its own words (or its one bit on a coil/discrete)."""
    if len(words) != reg.words:
        raise ValueError(f"{reg.name}: {reg.kind} needs {reg.words} words, got {len(words)}")
    kind = reg.kind
    if kind == "bool":
        return bool(words[0])
    if kind == "bit":
        assert reg.bit is not None
        word = _swap(words[0]) if reg.byte_order == "little" else words[0]
        return bool((word >> reg.bit) & 1)
    value: int | float = struct.unpack(_FORMATS[kind], _to_wire(words, reg))[0]
    return _shortest_float32(value) if kind == "float32" else value


def _shortest_float32(x: float) -> float:
    """The shortest decimal that is the same float32: 21.7, not 21.700000762939453."""
    if not math.isfinite(x):
        return x
    packed = struct.pack(">f", x)
    for digits in range(1, 10):
        y = float(f"{x:.{digits}g}")
        try:
            if struct.pack(">f", y) == packed:
                return y
        except OverflowError:  # rounded past the float32 range
            continue
    return x


def scaled(raw: Value, reg: Register) -> Value:
    """raw * scale + offset (to 15 significant digits: 12.2, not 12.200000000000001);
    integers stay integers when there is nothing to apply."""
    if isinstance(raw, bool) or not is_scaled(reg):
        return raw
    value = raw * reg.scale + reg.offset
    return float(f"{value:.15g}") if math.isfinite(value) else value


def decode(words: Sequence[int], reg: Register) -> Value:
    """The engineering value of ``reg`` from its own words."""
    return scaled(decode_raw(words, reg), reg)


def encode(raw: Value, reg: Register) -> list[int]:
    """The words a device holds for raw value ``raw`` (inverse of `decode_raw`, for tests)."""
    kind = reg.kind
    if kind == "bool":
        return [int(bool(raw))]
    if kind == "bit":
        assert reg.bit is not None
        word = (1 << reg.bit) if raw else 0
        return [_swap(word) if reg.byte_order == "little" else word]
    return _from_wire(struct.pack(_FORMATS[kind], raw), reg)


def is_scaled(reg: Register) -> bool:
    return reg.scale != 1.0 or reg.offset != 0.0


def datatype(reg: Register) -> DataType:
    """The birth datatype: float32 -> float, float64 and scaled integers -> double."""
    kind = reg.kind
    if kind in ("bool", "bit"):
        return "bool"
    if kind == "float32":
        return "double" if is_scaled(reg) else "float"
    if kind == "float64" or is_scaled(reg):
        return "double"
    assert kind in ("int16", "uint16", "int32", "uint32")
    return kind


def source(reg: Register, unit_id: int) -> str:
    """``modbus:unit=1/holding/100/float32`` (``/bit3`` for a bit field)."""
    text = f"modbus:unit={unit_id}/{reg.table}/{reg.address}/{reg.kind}"
    return f"{text}/bit{reg.bit}" if reg.kind == "bit" else text


def metric_def(reg: Register, unit_id: int) -> MetricDef:
    return MetricDef(
        name=reg.name,
        datatype=datatype(reg),
        unit=reg.unit,
        low=reg.low,
        high=reg.high,
        description=reg.description,
        source=source(reg, unit_id),
    )


# ---- read planning ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    registers: tuple[Register, ...]

    @property
    def end(self) -> int:
        return self.address + self.count - 1

    def values(self, words: Sequence[int]) -> dict[str, Value]:
        """Decode every register of this read from the words (or bits) it returned."""
        out: dict[str, Value] = {}
        for reg in self.registers:
            start = reg.address - self.address
            out[reg.name] = decode(words[start : start + reg.words], reg)
        return out

    def __str__(self) -> str:
        if self.count == 1:
            return f"{self.table} {self.address}"
        return f"{self.table} {self.address}-{self.end}"


def plan_reads(registers: Iterable[Register], *, max_block: int, max_gap: int) -> list[Read]:
    """Coalesce registers of one poll group into few reads, per table.

    Two ranges share a read when at most ``max_gap`` unused addresses lie between them
    and the read stays within ``max_block`` addresses.
    """
    by_table: dict[Table, list[Register]] = {}
    for reg in registers:
        by_table.setdefault(reg.table, []).append(reg)
    reads: list[Read] = []
    for table in sorted(by_table):
        regs = sorted(by_table[table], key=lambda r: (r.address, r.end))
        current: list[Register] = []
        start = end = 0
        for reg in regs:
            if reg.words > max_block:
                raise ValueError(f"{reg.name}: {reg.words} words exceed max_block {max_block}")
            if current and (
                reg.address - end - 1 <= max_gap and max(end, reg.end) - start + 1 <= max_block
            ):
                current.append(reg)
                end = max(end, reg.end)
                continue
            if current:
                reads.append(Read(table, start, end - start + 1, tuple(current)))
            current, start, end = [reg], reg.address, reg.end
        if current:
            reads.append(Read(table, start, end - start + 1, tuple(current)))
    return reads


def plan_groups(
    registers: Iterable[Register], *, max_block: int, max_gap: int
) -> dict[str, list[Read]]:
    """`plan_reads` per poll group."""
    groups: dict[str, list[Register]] = {}
    for reg in registers:
        groups.setdefault(reg.group, []).append(reg)
    return {g: plan_reads(regs, max_block=max_block, max_gap=max_gap) for g, regs in groups.items()}


# ---- report by exception -------------------------------------------------------------------


@dataclass(slots=True)
class _Last:
    value: Value | None
    good: bool
    sent: float


@dataclass
class Reporter:
    """What to publish for one device: changes beyond the deadband, due heartbeats, bad once.

    Values are compared with the last *published* value, so a slow drift is reported
    once it adds up to more than the deadband.
    """

    deadbands: Mapping[str, float]
    heartbeat_s: float
    last: dict[str, _Last] = field(default_factory=dict)

    def changed(self, values: Mapping[str, Value], now: float) -> dict[str, Value]:
        """The good values to publish now (and remember as published)."""
        out: dict[str, Value] = {}
        for name, value in values.items():
            prev = self.last.get(name)
            if (
                prev is None
                or not prev.good
                or now - prev.sent >= self.heartbeat_s
                or _differs(prev.value, value, self.deadbands.get(name, 0.0))
            ):
                out[name] = value
                self.last[name] = _Last(value, True, now)
        return out

    def bad(self, names: Iterable[str], now: float) -> list[str]:
        """Of ``names`` now unreadable, those not yet published as bad (so bad goes out once)."""
        out: list[str] = []
        for name in names:
            prev = self.last.get(name)
            if prev is None or prev.good:
                out.append(name)
                self.last[name] = _Last(None, False, now)
        return out

    def reset(self) -> None:
        """Forget everything: after a (re)birth every value is published again."""
        self.last.clear()


def _differs(old: Value | None, new: Value, deadband: float) -> bool:
    if old is None or isinstance(new, bool) or isinstance(old, bool):
        return old != new
    if isinstance(old, float) and isinstance(new, float) and (math.isnan(old) or math.isnan(new)):
        return math.isnan(old) != math.isnan(new)
    if deadband > 0.0:
        return abs(new - old) > deadband
    return bool(old != new)


def is_finite(value: Value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
