"""The Modbus adapter's pure logic and settings: decoding, read planning, report by exception."""

from __future__ import annotations

import itertools
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uns import ConfigError, load
from uns_modbus_adapter import ModbusAdapterSettings, Register
from uns_modbus_adapter.logic import (
    Reporter,
    datatype,
    decode,
    decode_raw,
    encode,
    metric_def,
    plan_groups,
    plan_reads,
)


def reg(**kw: Any) -> Register:
    kw.setdefault("name", "x")
    kw.setdefault("table", "holding")
    kw.setdefault("address", 0)
    return Register(**kw)


# ---- decoding ------------------------------------------------------------------------------

# The words a device holds for one value, for every word order and byte order:
# big/big is ABCD, little/big CDAB, big/little BADC, little/little DCBA.
DECODE_TABLE = [
    ("int16", "big", "big", [0xFB2E], -1234),
    ("int16", "little", "big", [0xFB2E], -1234),
    ("int16", "big", "little", [0x2EFB], -1234),
    ("int16", "little", "little", [0x2EFB], -1234),
    ("uint16", "big", "big", [0xABCD], 0xABCD),
    ("uint16", "little", "big", [0xABCD], 0xABCD),
    ("uint16", "big", "little", [0xCDAB], 0xABCD),
    ("uint16", "little", "little", [0xCDAB], 0xABCD),
    ("int32", "big", "big", [0xF8A4, 0x32EB], -123456789),
    ("int32", "little", "big", [0x32EB, 0xF8A4], -123456789),
    ("int32", "big", "little", [0xA4F8, 0xEB32], -123456789),
    ("int32", "little", "little", [0xEB32, 0xA4F8], -123456789),
    ("uint32", "big", "big", [0x1234, 0x5678], 0x12345678),
    ("uint32", "little", "big", [0x5678, 0x1234], 0x12345678),
    ("uint32", "big", "little", [0x3412, 0x7856], 0x12345678),
    ("uint32", "little", "little", [0x7856, 0x3412], 0x12345678),
    ("float32", "big", "big", [0x42F6, 0xE979], 123.456),
    ("float32", "little", "big", [0xE979, 0x42F6], 123.456),
    ("float32", "big", "little", [0xF642, 0x79E9], 123.456),
    ("float32", "little", "little", [0x79E9, 0xF642], 123.456),
    ("float64", "big", "big", [0xC093, 0x4A45, 0x6D5C, 0xFAAD], -1234.5678),
    ("float64", "little", "big", [0xFAAD, 0x6D5C, 0x4A45, 0xC093], -1234.5678),
    ("float64", "big", "little", [0x93C0, 0x454A, 0x5C6D, 0xADFA], -1234.5678),
    ("float64", "little", "little", [0xADFA, 0x5C6D, 0x454A, 0x93C0], -1234.5678),
]


@pytest.mark.parametrize(("kind", "word_order", "byte_order", "words", "expected"), DECODE_TABLE)
def test_every_type_decodes_in_every_word_and_byte_order(
    kind: str, word_order: str, byte_order: str, words: list[int], expected: float
) -> None:
    r = reg(type=kind, word_order=word_order, byte_order=byte_order)
    value = decode(words, r)
    assert value == expected, "float32 too: the shortest decimal of the same float32"
    assert type(value) is type(expected)
    assert encode(decode_raw(words, r), r) == words, "encode is decode's inverse"


@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("int16", -32768),
        ("int16", 32767),
        ("uint16", 65535),
        ("int32", -(2**31)),
        ("int32", -1),
        ("uint32", 2**32 - 1),
        ("float32", -0.5),
        ("float64", 2.0**60 + 0.5**3),
        ("float64", -1e-300),
    ],
)
def test_extreme_values_survive_an_encode_decode_round_trip(
    kind: str, value: float, word_order: str, byte_order: str
) -> None:
    r = reg(type=kind, word_order=word_order, byte_order=byte_order)
    assert decode(encode(value, r), r) == value


def test_a_float32_reads_as_the_decimal_that_was_written() -> None:
    r = reg(type="float32")
    assert decode(encode(21.7, r), r) == 21.7, "not 21.700000762939453"
    assert decode(encode(3.4028235e38, r), r) == 3.4028235e38
    assert decode(encode(1e-45, r), r) == 1e-45, "the smallest subnormal"
    assert decode(encode(-0.1, r), r) == -0.1


def test_a_float32_nan_decodes_to_nan_and_infinity_to_infinity() -> None:
    r = reg(type="float32")
    assert math.isnan(decode(encode(math.nan, r), r))
    assert decode([0x7F80, 0x0000], r) == math.inf
    assert decode([0xFF80, 0x0000], r) == -math.inf


@pytest.mark.parametrize("bit", range(16))
def test_a_bit_field_reads_one_bit_of_a_register(bit: int) -> None:
    r = reg(type="bit", bit=bit)
    assert decode([1 << bit], r) is True
    assert decode([0xFFFF ^ (1 << bit)], r) is False
    swapped = reg(type="bit", bit=bit, byte_order="little")
    assert decode([((1 << bit) >> 8) | (((1 << bit) & 0xFF) << 8)], swapped) is True


def test_coils_and_discrete_inputs_are_booleans() -> None:
    assert decode([1], reg(table="coil")) is True
    assert decode([0], reg(table="discrete")) is False
    assert reg(table="coil").kind == "bool"
    assert reg(table="holding").kind == "uint16", "registers default to uint16"


def test_scale_and_offset_give_the_engineering_value() -> None:
    assert decode([0xFF85], reg(type="int16", scale=0.1)) == -12.3
    assert decode([122], reg(type="int16", scale=0.1)) == 12.2, "not 12.200000000000001"
    assert decode([500], reg(scale=0.1, offset=-40.0)) == 10.0
    assert decode([0, 1000], reg(type="uint32", scale=0.001)) == 1.0
    assert decode(encode(21.7, reg(type="float32")), reg(type="float32", scale=2.0)) == 43.4
    plain = decode([500], reg())
    assert plain == 500 and isinstance(plain, int), "unscaled integers stay integers"


def test_the_birth_says_each_metrics_datatype_unit_range_and_source() -> None:
    assert datatype(reg(type="float32")) == "float"
    assert datatype(reg(type="float64")) == "double"
    assert datatype(reg(type="int16", scale=0.1)) == "double"
    assert datatype(reg(type="uint32", offset=1)) == "double"
    assert datatype(reg(type="int32")) == "int32"
    assert datatype(reg(type="bit", bit=2)) == "bool"
    assert datatype(reg(table="coil")) == "bool"
    d = metric_def(
        reg(name="temp", address=100, type="float32", unit="degC", low=0, high=150), unit_id=3
    )
    assert (d.name, d.unit, d.low, d.high) == ("temp", "degC", 0, 150)
    assert d.source == "modbus:unit=3/holding/100/float32"
    assert metric_def(reg(type="bit", bit=7), 1).source == "modbus:unit=1/holding/0/bit/bit7"
    assert metric_def(reg(table="coil", address=4), 1).source == "modbus:unit=1/coil/4/bool"


# ---- read planning --------------------------------------------------------------------------


def ten_registers_in_three_ranges() -> list[Register]:
    a = [reg(name=f"a{i}", address=i) for i in range(4)]  # 0-3
    b = [
        reg(name="b0", address=8, type="int32"),  # 8-9
        reg(name="b1", address=10),
        reg(name="b2", address=11),
    ]
    c = [
        reg(name="c0", address=50, type="float32"),  # 50-51
        reg(name="c1", address=52),
        reg(name="c2", address=53),
    ]
    return a + b + c


def test_ten_registers_in_three_ranges_are_read_with_two_requests() -> None:
    reads = plan_reads(ten_registers_in_three_ranges(), max_block=100, max_gap=8)
    assert [(r.table, r.address, r.count) for r in reads] == [
        ("holding", 0, 12),
        ("holding", 50, 4),
    ]
    assert sum(len(r.registers) for r in reads) == 10


def test_a_read_never_exceeds_max_block() -> None:
    reads = plan_reads(ten_registers_in_three_ranges(), max_block=6, max_gap=8)
    assert [(r.address, r.count) for r in reads] == [(0, 4), (8, 4), (50, 4)]
    many = [reg(name=f"r{i}", address=i) for i in range(300)]
    reads = plan_reads(many, max_block=125, max_gap=8)
    assert [r.count for r in reads] == [125, 125, 50]
    assert all(r.count <= 125 for r in reads)


def test_a_32_bit_value_is_never_split_across_reads() -> None:
    regs = [reg(name=f"f{i}", address=2 * i, type="float32") for i in range(5)]  # 0..9
    reads = plan_reads(regs, max_block=5, max_gap=0)
    assert [(r.address, r.count) for r in reads] == [(0, 4), (4, 4), (8, 2)]


def test_the_gap_limit_is_inclusive() -> None:
    at = [reg(name="a", address=0), reg(name="b", address=9)]  # 8 unused between
    assert len(plan_reads(at, max_block=100, max_gap=8)) == 1
    assert len(plan_reads(at, max_block=100, max_gap=7)) == 2


def test_tables_and_poll_groups_are_planned_separately() -> None:
    regs = [
        reg(name="h", table="holding", address=0),
        reg(name="i", table="input", address=1),
        reg(name="c", table="coil", address=0),
        reg(name="c2", table="coil", address=5),
        reg(name="s", table="holding", address=1, group="slow"),
    ]
    plans = plan_groups(regs, max_block=100, max_gap=8)
    assert {g: [(r.table, r.address, r.count) for r in p] for g, p in plans.items()} == {
        "fast": [("coil", 0, 6), ("holding", 0, 1), ("input", 1, 1)],
        "slow": [("holding", 1, 1)],
    }


@st.composite
def register_sets(draw: st.DrawFn) -> list[Register]:
    kinds = ["uint16", "int32", "float64", "bit"]
    taken: set[int] = set()
    out: list[Register] = []
    for i in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(kinds))
        address = draw(st.integers(0, 400))
        words = {"uint16": 1, "int32": 2, "float64": 4, "bit": 1}[kind]
        span = set(range(address, address + words))
        if span & taken:
            continue
        taken |= span
        bit = draw(st.integers(0, 15)) if kind == "bit" else None
        out.append(reg(name=f"r{i}", address=address, type=kind, bit=bit))
    return out


@given(register_sets(), st.integers(4, 125), st.integers(0, 20))
def test_every_register_is_read_exactly_once_within_the_limits(
    regs: list[Register], max_block: int, max_gap: int
) -> None:
    reads = plan_reads(regs, max_block=max_block, max_gap=max_gap)
    covered = [r.name for read in reads for r in read.registers]
    assert sorted(covered) == sorted(r.name for r in regs)
    for read in reads:
        assert 1 <= read.count <= max_block
        assert all(read.address <= r.address and r.end <= read.end for r in read.registers)
    for a, b in itertools.pairwise(reads):
        assert a.end < b.address, "reads never overlap"


def test_bit_fields_of_one_register_share_a_read() -> None:
    regs = [reg(name=f"b{i}", address=7, type="bit", bit=i) for i in (0, 3, 15)]
    (read,) = plan_reads(regs, max_block=100, max_gap=0)
    assert (read.address, read.count) == (7, 1)
    assert read.values([0b1000_0000_0000_1001]) == {"b0": True, "b3": True, "b15": True}


def test_a_read_decodes_every_register_it_covers() -> None:
    regs = [
        reg(name="t", address=10, type="float32", word_order="little"),
        reg(name="p", address=14, type="int16", scale=0.1),
    ]
    (read,) = plan_reads(regs, max_block=100, max_gap=8)
    words = [0] * read.count
    words[0:2] = encode(21.5, regs[0])
    words[4:5] = encode(-123, regs[1])
    values = read.values(words)
    assert values["t"] == 21.5
    assert values["p"] == pytest.approx(-12.3)


# ---- report by exception --------------------------------------------------------------------


def test_the_first_values_are_all_published_then_only_changes() -> None:
    r = Reporter({}, heartbeat_s=30)
    assert r.changed({"a": 1, "b": True}, now=0) == {"a": 1, "b": True}
    assert r.changed({"a": 1, "b": True}, now=1) == {}
    assert r.changed({"a": 2, "b": True}, now=2) == {"a": 2}
    assert r.changed({"a": 2, "b": False}, now=3) == {"b": False}


def test_a_change_within_the_deadband_waits_until_it_adds_up() -> None:
    r = Reporter({"t": 0.5}, heartbeat_s=30)
    assert r.changed({"t": 20.0}, now=0) == {"t": 20.0}
    assert r.changed({"t": 20.3}, now=1) == {}
    assert r.changed({"t": 20.5}, now=2) == {}, "exactly the deadband is not beyond it"
    assert r.changed({"t": 20.6}, now=3) == {"t": 20.6}, "compared with the last published"
    assert r.changed({"t": 20.0}, now=4) == {"t": 20.0}


def test_an_unchanged_value_is_published_again_at_the_heartbeat() -> None:
    r = Reporter({}, heartbeat_s=10)
    r.changed({"a": 1, "b": 2}, now=0)
    r.changed({"a": 1, "b": 3}, now=5)
    assert r.changed({"a": 1, "b": 3}, now=9.9) == {}
    assert r.changed({"a": 1, "b": 3}, now=10) == {"a": 1}
    assert r.changed({"a": 1, "b": 3}, now=15) == {"b": 3}


def test_bad_is_published_once_and_the_next_good_value_always() -> None:
    r = Reporter({"a": 100.0}, heartbeat_s=30)
    r.changed({"a": 5.0}, now=0)
    assert r.bad(["a"], now=1) == ["a"]
    assert r.bad(["a"], now=2) == []
    assert r.changed({"a": 5.0}, now=3) == {"a": 5.0}, "good again, even unchanged"
    assert r.bad(["never_seen"], now=4) == ["never_seen"]


def test_after_a_reset_every_value_is_published_again() -> None:
    r = Reporter({}, heartbeat_s=30)
    r.changed({"a": 1}, now=0)
    r.reset()
    assert r.changed({"a": 1}, now=1) == {"a": 1}


def test_a_steady_nan_is_not_republished_every_poll() -> None:
    r = Reporter({}, heartbeat_s=30)
    assert list(r.changed({"a": math.nan}, now=0)) == ["a"]
    assert r.changed({"a": math.nan}, now=1) == {}
    assert r.changed({"a": 1.0}, now=2) == {"a": 1.0}


# ---- settings -----------------------------------------------------------------------------

DEV = "acme/pune/stamping/line-3/cell-a/press-0"


def service_config(tmp_path: Path, section: str, env: dict[str, str] | None = None) -> Any:
    file = tmp_path / "plant.yaml"
    file.write_text("services:\n  modbus-adapter:\n" + section)
    return load(file, environ=env or {}).service("modbus-adapter", ModbusAdapterSettings)


def config_error(tmp_path: Path, section: str) -> str:
    with pytest.raises(ConfigError) as err:
        service_config(tmp_path, section)
    return str(err.value)


def test_a_full_config_decodes_with_templates_applied_first(tmp_path: Path) -> None:
    s = service_config(
        tmp_path,
        f"""
    host: 192.168.10.20
    port: 502
    templates:
      press:
        - {{name: bearing_temp, table: holding, address: 0, type: float32, word_order: little}}
        - {{name: running, table: coil, address: 0}}
    devices:
      - path: {DEV}1
        unit_id: 1
        template: press
        registers:
          - {{name: pressure, table: holding, address: 2, type: int16, scale: 0.1, group: slow}}
""",
        env={"UNS_SERVICES__MODBUS_ADAPTER__TIMEOUT_S": "0.5"},
    )
    assert (s.host, s.port, s.timeout_s) == ("192.168.10.20", 502, 0.5)
    assert [r.name for r in s.registers_of(s.devices[0])] == ["bearing_temp", "running", "pressure"]
    assert s.poll_groups == {"fast": 0.2, "slow": 1.0}


def test_overlapping_registers_are_refused_naming_the_device_and_both_registers(
    tmp_path: Path,
) -> None:
    message = config_error(
        tmp_path,
        f"""
    devices:
      - {{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: holding, address: 0}}]}}
      - {{path: {DEV}2, unit_id: 2, registers: [{{name: a, table: holding, address: 0}}]}}
      - path: {DEV}3
        unit_id: 3
        registers:
          - {{name: bearing_temp, table: holding, address: 0, type: float32}}
          - {{name: pressure, table: holding, address: 1, type: int32}}
""",
    )
    assert (
        f"services.modbus-adapter: devices[2] ({DEV}3): registers 'bearing_temp' (holding 0-1)"
        " and 'pressure' (holding 1-2) overlap" in message
    )
    assert "plant.yaml" in message


def test_an_unknown_register_type_is_refused_with_its_path(tmp_path: Path) -> None:
    message = config_error(
        tmp_path,
        f"""
    devices:
      - path: {DEV}1
        unit_id: 1
        registers: [{{name: a, table: holding, address: 0, type: float16}}]
""",
    )
    assert "services.modbus-adapter.devices[0].registers[0].type" in message
    assert "float16" in message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, template: pump}}]",
            f"devices[0] ({DEV}1): unknown template 'pump'",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: input,"
            " address: 0, group: medium}]}]",
            f"devices[0] ({DEV}1): register 'a': unknown poll group 'medium'"
            " (poll_groups: fast, slow)",
        ),
        (
            "templates: {pump: [{name: a, table: input, address: 0, group: medium}]}",
            "templates.pump: register 'a': unknown poll group 'medium'",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: holding,"
            " address: 3, type: bit}]}]",
            "devices[0].registers[0]: register 'a': type 'bit' needs 'bit' (0..15)",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: holding,"
            " address: 3, type: bool}]}]",
            "devices[0].registers[0]: register 'a': type 'bool' on a holding register",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: coil,"
            " address: 3, type: int16}]}]",
            "devices[0].registers[0]: register 'a': type 'int16' on a coil",
        ),
        (
            "templates: {pump: [{name: a, table: coil, address: 0}]}\n"
            f"    devices: [{{path: {DEV}1, unit_id: 1, template: pump,"
            " registers: [{name: a, table: coil, address: 1}]}]",
            f"devices[0] ({DEV}1): register name 'a' is used twice",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: holding,"
            " address: 0, type: bit, bit: 1}, {name: b, table: holding, address: 0,"
            " type: bit, bit: 1}]}]",
            "registers 'a' (holding 0.1) and 'b' (holding 0.1) overlap",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: coil,"
            f" address: 0}}]}}, {{path: {DEV}1, unit_id: 2, registers: [{{name: a, table: coil,"
            " address: 0}]}]",
            f"devices[1] ({DEV}1): path already used by devices[0]",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 5, registers: [{{name: a, table: coil,"
            f" address: 0}}]}}, {{path: {DEV}2, unit_id: 5, registers: [{{name: a, table: coil,"
            " address: 0}]}]",
            f"devices[1] ({DEV}2): unit_id 5 already used by devices[0]",
        ),
        (
            "poll_groups: {fast: 0}",
            "poll_groups.fast: interval must be > 0 s",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 1, registers: [{{name: a, table: coil,"
            " address: 0, colour: red}]}]",
            "devices[0].registers[0]: Object contains unknown field `colour`",
        ),
        (
            f"devices: [{{path: {DEV}1, unit_id: 248, registers: []}}]",
            "devices[0].unit_id: Expected `int` <= 247",
        ),
        (
            "max_block: 200",
            "services.modbus-adapter.max_block: Expected `int` <= 125",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_entry(
    tmp_path: Path, section: str, expected: str
) -> None:
    assert expected in config_error(tmp_path, f"    {section}\n")


def test_a_bit_field_next_to_another_is_fine_and_a_device_without_registers_is_not(
    tmp_path: Path,
) -> None:
    s = service_config(
        tmp_path,
        f"""
    devices:
      - path: {DEV}1
        unit_id: 1
        registers:
          - {{name: a, table: holding, address: 0, type: bit, bit: 0}}
          - {{name: b, table: holding, address: 0, type: bit, bit: 1}}
""",
    )
    assert len(s.registers_of(s.devices[0])) == 2
    assert "no registers" in config_error(
        tmp_path, f"    devices: [{{path: {DEV}1, unit_id: 1}}]\n"
    )


def test_floats_packed_by_hand_match_the_decoder() -> None:
    """A last cross-check against struct with explicit little-endian formats."""
    words = [int.from_bytes(struct.pack("<f", 3.5)[i : i + 2], "big") for i in (0, 2)]
    assert decode(words, reg(type="float32", word_order="little", byte_order="little")) == 3.5
