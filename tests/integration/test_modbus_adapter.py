"""The Modbus adapter against a real pymodbus TCP server on a free port."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymodbus.constants import ExcCodes

from fixtures.modbus import ModbusPlc
from uns import DeviceBirth, DeviceData, DeviceDeath, Message, decode
from uns.testing import Watcher, running, watching
from uns_modbus_adapter import ModbusAdapter, ModbusDevice, Register

pytestmark = pytest.mark.integration


@pytest.fixture
async def plc() -> AsyncIterator[ModbusPlc]:
    async with ModbusPlc() as server:
        yield server


def path(prefix: str, device: str) -> str:
    return f"{prefix}/pune/area/line/cell/{device}"


def reg(**kw: Any) -> Register:
    return Register(**kw)


def dev(path: str, unit_id: int, registers: list[Register] = [], **kw: Any) -> ModbusDevice:  # noqa: B006
    return ModbusDevice(path=path, unit_id=unit_id, registers=registers, **kw)


TEMPLATE = [
    reg(
        name="bearing_temp",
        table="holding",
        address=0,
        type="float32",
        word_order="little",
        unit="degC",
        low=-40,
        high=150,
    ),
    reg(name="pressure", table="holding", address=2, type="int16", scale=0.1, unit="bar"),
    reg(name="running", table="coil", address=3),
]
OWN = [
    reg(name="cycles", table="input", address=10, type="uint32", unit="1"),
    reg(name="door_open", table="discrete", address=5),
    reg(name="fault", table="holding", address=20, type="bit", bit=3),
    reg(name="mode", table="holding", address=21, byte_order="little"),
]
FAST = {"fast": 0.05, "slow": 0.2}


def adapter(plc: ModbusPlc, **settings: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": plc.port,
        "timeout_s": 0.2,
        "poll_groups": FAST,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    return base | settings


def data_of(m: Message) -> dict[str, Any]:
    payload = decode(m.payload)
    assert isinstance(payload, DeviceData)
    return {x.name: x for x in payload.metrics}


def is_data(m: Message, device: str, pred: Any = None) -> bool:
    if not (m.topic.endswith(f"/{device}/raw/data") and m.payload):
        return False
    return pred is None or bool(pred(data_of(m)))


async def wait_data(w: Watcher, device: str, pred: Any = None, timeout: float = 5) -> Any:
    return data_of(await w.wait_for(lambda m: is_data(m, device, pred), timeout))


async def wait_kind(w: Watcher, device: str, kind: str, timeout: float = 5) -> Any:
    m = await w.wait_for(
        lambda m: m.topic.endswith(f"/{device}/raw/{kind}") and bool(m.payload), timeout
    )
    return decode(m.payload)


def metric(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, {"service": "modbus-adapter", **labels})
    return value or 0.0


async def test_every_register_arrives_on_its_device_topic_with_its_unit_and_good_quality(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    values = {
        "bearing_temp": 71.3,
        "pressure": -123,
        "running": True,
        "cycles": 3_000_000_000,
        "door_open": True,
        "fault": True,
        "mode": 0x0102,
    }
    for r in TEMPLATE + OWN:
        await plc.set(1, r, values[r.name])
    device = path(prefix, "dev-1")
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter,
            memory_url,
            prefix,
            **adapter(plc),
            templates={"press": TEMPLATE},
            devices=[dev(device, 1, OWN, template="press")],
        ) as node,
    ):
        birth = await wait_kind(w, "dev-1", "birth")
        data = await wait_data(w, "dev-1")
        reads_ok = metric(node, "uns_modbus_reads_total", result="ok")

    assert isinstance(birth, DeviceBirth)
    assert birth.device == device
    defs = {d.name: d for d in birth.metrics}
    assert set(defs) == set(values)
    assert (defs["bearing_temp"].datatype, defs["bearing_temp"].unit) == ("float", "degC")
    assert (defs["bearing_temp"].low, defs["bearing_temp"].high) == (-40, 150)
    assert defs["bearing_temp"].source == "modbus:unit=1/holding/0/float32"
    assert (defs["pressure"].datatype, defs["pressure"].unit) == ("double", "bar")
    assert defs["running"].datatype == "bool"
    assert defs["cycles"].datatype == "uint32"
    assert defs["fault"].source == "modbus:unit=1/holding/20/bit/bit3"
    assert set(data) == set(values), "the first data message carries every metric"
    assert all(m.quality == "good" for m in data.values())
    assert data["bearing_temp"].value == 71.3  # float32, CDAB
    assert data["pressure"].value == -12.3  # int16 * 0.1
    assert data["running"].value is True
    assert data["cycles"].value == 3_000_000_000
    assert data["door_open"].value is True
    assert data["fault"].value is True
    assert data["mode"].value == 0x0102
    assert reads_ok >= 4, "at least one request per table"


async def test_a_changed_register_is_published_at_once_and_an_unchanged_one_at_the_heartbeat(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    regs = [
        reg(name="speed", table="holding", address=0, unit="rpm"),
        reg(name="temp", table="holding", address=1, scale=0.5, deadband=1.0),
    ]
    await plc.set(1, regs[0], 1000)
    await plc.set(1, regs[1], 100)
    heartbeat = 0.8
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter,
            memory_url,
            prefix,
            **adapter(plc, heartbeat_s=heartbeat),
            devices=[dev(path(prefix, "dev-1"), 1, regs)],
        ),
    ):
        first = await wait_data(w, "dev-1")
        t_first = time.monotonic()
        assert (first["speed"].value, first["temp"].value) == (1000, 50.0)

        await plc.set(1, regs[0], 1200)
        changed = await wait_data(w, "dev-1")
        assert set(changed) == {"speed"}, "only what changed"
        assert changed["speed"].value == 1200

        await plc.set(1, regs[1], 101)  # +0.5, within the 1.0 deadband: not published
        await plc.set(1, regs[0], 1300)
        assert set(await wait_data(w, "dev-1")) == {"speed"}

        again = await wait_data(w, "dev-1", lambda d: "temp" in d)
        assert time.monotonic() - t_first >= heartbeat * 0.9, "unchanged: only at the heartbeat"
        assert again["temp"].value == 50.5


async def test_a_failing_unit_turns_bad_then_dead_then_is_born_again_when_it_answers(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    regs = [reg(name="level", table="holding", address=0, unit="mm")]
    for unit in (1, 2):
        await plc.set(unit, regs[0], 40 + unit)
    devices = [
        dev(path(prefix, "ok-1"), 1, regs),
        dev(path(prefix, "gw-2"), 2, regs),
        dev(path(prefix, "gone-7"), 7, regs),  # not served
    ]
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter, memory_url, prefix, **adapter(plc, max_failures=3), devices=devices
        ) as node,
    ):
        assert (await wait_data(w, "gw-2"))["level"].value == 42

        plc.faults[2] = ExcCodes.GATEWAY_NO_RESPONSE
        bad = (await wait_data(w, "gw-2"))["level"]
        assert (bad.quality, bad.reason, bad.value) == ("bad", "ModbusException:11", None)
        death = await wait_kind(w, "gw-2", "death")
        assert isinstance(death, DeviceDeath)
        assert death.reason == "ModbusException:11"
        bad_messages = [m for m in w.seen if is_data(m, "gw-2", lambda d: "level" in d)]
        assert len(bad_messages) == 2, "one good, then bad once; nothing while failing"

        plc.faults[2] = None
        await wait_kind(w, "gw-2", "birth")
        back = (await wait_data(w, "gw-2"))["level"]
        assert (back.quality, back.value) == ("good", 42)

        # a unit id the server does not serve: it answers 'device failure' (4)
        if not any(m.topic.endswith("/gone-7/raw/death") and m.payload for m in w.seen):
            await wait_kind(w, "gone-7", "death")
        errors = metric(node, "uns_modbus_errors_total", reason="exception")
        failed_reads = metric(node, "uns_modbus_reads_total", result="error")
    gone = [data_of(m)["level"] for m in w.seen if is_data(m, "gone-7")]
    assert [(g.quality, g.reason) for g in gone] == [("bad", "ModbusException:4")]
    ok = [data_of(m)["level"] for m in w.seen if is_data(m, "ok-1")]
    assert [(g.quality, g.value) for g in ok] == [("good", 41)], "the healthy unit is unaffected"
    assert errors >= 6 and failed_reads >= 6


async def test_a_silent_unit_times_out_and_dies_while_the_others_keep_publishing(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    regs = [reg(name="flow", table="input", address=0)]
    await plc.set(1, regs[0], 11)
    await plc.set(3, regs[0], 33)
    plc.faults[3] = "silent"
    devices = [
        dev(path(prefix, "ok-1"), 1, regs),
        dev(path(prefix, "mute-3"), 3, regs),
    ]
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter,
            memory_url,
            prefix,
            **adapter(plc, max_failures=2, timeout_s=0.1),
            devices=devices,
        ) as node,
    ):
        bad = (await wait_data(w, "mute-3"))["flow"]
        assert (bad.quality, bad.reason) == ("bad", "timeout")
        assert (await wait_kind(w, "mute-3", "death")).reason == "timeout"
        await plc.set(1, regs[0], 12)
        assert (await wait_data(w, "ok-1", lambda d: d["flow"].value == 12))["flow"].quality == (
            "good"
        )
        assert metric(node, "uns_modbus_errors_total", reason="timeout") >= 2
        assert metric(node, "uns_modbus_errors_total", reason="connection") == 0


async def test_a_register_the_unit_refuses_is_bad_but_the_device_stays_alive(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    regs = [
        reg(name="ok", table="holding", address=0),
        reg(name="nowhere", table="holding", address=1000),  # beyond the unit's memory
    ]
    await plc.set(1, regs[0], 5)
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter,
            memory_url,
            prefix,
            **adapter(plc, max_failures=1),
            devices=[dev(path(prefix, "dev-1"), 1, regs)],
        ),
    ):
        first = await wait_data(w, "dev-1")
        assert first["ok"].value == 5
        assert (first["nowhere"].quality, first["nowhere"].reason) == ("bad", "ModbusException:2")
        await plc.set(1, regs[0], 6)
        assert (await wait_data(w, "dev-1"))["ok"].value == 6
    assert not any(m.topic.endswith("/raw/death") and m.payload for m in w.seen)


async def test_stopping_the_server_kills_every_device_and_restarting_it_brings_births_then_data(
    plc: ModbusPlc, memory_url: str, prefix: str
) -> None:
    regs = [reg(name="speed", table="holding", address=0)]
    await plc.set(1, regs[0], 7)
    await plc.set(2, regs[0], 8)
    devices = [
        dev(path(prefix, "dev-1"), 1, regs),
        dev(path(prefix, "dev-2"), 2, regs),
    ]
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(ModbusAdapter, memory_url, prefix, **adapter(plc), devices=devices) as node,
    ):
        await wait_data(w, "dev-2")
        await plc.stop()
        deaths = {}
        while len(deaths) < 2:
            m = await w.wait_for(lambda m: m.topic.endswith("/raw/death") and bool(m.payload))
            deaths[m.topic] = decode(m.payload)
        assert {d.reason for d in deaths.values()} == {"connection"}

        await plc.start()
        mark = len(w.seen)
        for name in ("dev-1", "dev-2"):
            assert (await wait_data(w, name))["speed"].value in (7, 8)
        after = [m.topic.rsplit("/", 3)[-3:] for m in w.seen[mark:] if m.payload]
        for name in ("dev-1", "dev-2"):
            kinds = [k for d, _, k in after if d == name]
            assert kinds.index("birth") < kinds.index("data"), "birth before data"
        assert metric(node, "uns_modbus_errors_total", reason="connection") >= 1
        assert metric(node, "uns_modbus_reads_total", result="ok") >= 4


async def test_an_unreachable_plc_kills_the_devices_once_and_is_retried(
    memory_url: str, prefix: str
) -> None:
    plc = ModbusPlc()  # not started: connection refused
    regs = [reg(name="speed", table="holding", address=0)]
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            ModbusAdapter,
            memory_url,
            prefix,
            **adapter(plc),
            devices=[dev(path(prefix, "dev-1"), 1, regs)],
        ),
    ):
        death = await wait_kind(w, "dev-1", "death")
        assert death.reason == "connection"
        await plc.start()
        try:
            await wait_kind(w, "dev-1", "birth")
            await wait_data(w, "dev-1")
        finally:
            await plc.stop()
    assert len([m for m in w.seen if m.topic.endswith("/raw/death") and m.payload]) == 1
