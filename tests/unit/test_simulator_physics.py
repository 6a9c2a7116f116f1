"""The simulated machines: plausible, deterministic, and faults that show in the data."""

import numpy as np
import pytest

from uns import DevicePath
from uns_simulator.catalog import ASSETS, adapter_config, opcua_node_id
from uns_simulator.modbus_server import encode
from uns_simulator.physics import Bearing, Machine


def kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt((x**2).mean()))


def test_the_same_seed_gives_the_same_plant():
    a, b = Machine("press", 7), Machine("press", 7)
    for _ in range(20):
        a.step(0.5), b.step(0.5)
    assert a.values == b.values
    assert np.array_equal(a.vibration(1000), b.vibration(1000))
    assert not np.array_equal(
        Machine("press", 8).vibration(1000), Machine("press", 7).vibration(1000)
    )


def test_bearing_defect_frequencies_follow_the_geometry():
    f = Bearing().frequencies(1480 / 60)  # a 6205 at 1480 rpm
    assert f["bpfo"] == pytest.approx(88.42, abs=0.01)
    assert f["bpfi"] == pytest.approx(133.58, abs=0.01)
    assert f["bpfo"] + f["bpfi"] == pytest.approx(9 * 1480 / 60)


def test_a_healthy_press_runs_at_its_operating_point():
    m = Machine("press", 1)
    m.step(1.0)
    v = m.values
    assert 50 < v["bearing_temp"] < 60 and 200 < v["pressure"] < 220 and v["running"]
    x = m.vibration(10_000)
    assert 0.05 < rms(x) < 0.3 and kurtosis(x) < 3.5


def test_bearing_wear_grows_rms_kurtosis_temperature_and_bpfo_energy():
    m = Machine("press", 1)
    healthy = m.vibration(10_000)
    m.inject("bearing_wear", severity=1.0, ramp_s=600)
    m.step(300)
    half = m.vibration(10_000)
    for _ in range(60):
        m.step(10)
    worn = m.vibration(10_000)
    assert rms(healthy) < rms(half) < rms(worn)
    assert kurtosis(worn) > 5
    assert m.values["bearing_temp"] > 75
    env = np.abs(np.fft.rfft(np.abs(worn - worn.mean())))
    freqs = np.fft.rfftfreq(len(worn), 1 / 10_000)
    bpfo = Bearing().frequencies(m.shaft_hz)["bpfo"]
    peak = env[(freqs > bpfo - 2) & (freqs < bpfo + 2)].max()
    assert peak > 5 * np.median(env[(freqs > 20) & (freqs < 500)])


def test_a_hydraulic_leak_sags_pressure_and_raises_current():
    m = Machine("press", 1)
    m.step(1)
    before = dict(m.values)
    m.inject("hydraulic_leak", severity=0.8)
    m.step(1)
    assert m.values["pressure"] < 0.85 * before["pressure"]
    assert m.values["current"] > 1.2 * before["current"]


def test_sensor_faults_change_the_reading_not_the_process():
    m = Machine("press", 1)
    m.step(1)
    m.inject("stuck_sensor", tag="bearing_temp")
    stuck = m.readings()["bearing_temp"][0]
    m.inject("bearing_wear", severity=1.0)
    for _ in range(30):
        m.step(10)
    assert m.readings()["bearing_temp"][0] == stuck
    assert m.values["bearing_temp"] > stuck + 10
    m.clear("stuck_sensor")
    m.inject("sensor_drift", severity=1.0, ramp_s=100, tag="pressure")
    m.step(100)
    assert m.readings()["pressure"][0] == pytest.approx(m.values["pressure"] + 15, abs=0.01)


def test_a_dropout_makes_every_reading_bad():
    m = Machine("robot", 1)
    m.inject("dropout")
    assert {status for _, status in m.readings().values()} == {"BadCommunicationError"}
    m.clear()
    assert {status for _, status in m.readings().values()} == {None}


def test_faults_ramp_linearly_and_unknown_ones_are_refused():
    m = Machine("conveyor", 1)
    m.inject("bearing_wear", severity=0.8, ramp_s=100)
    m.step(50)
    assert m.level("bearing_wear") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown fault kind"):
        m.inject("gremlins")
    with pytest.raises(ValueError, match="severity"):
        m.inject("dropout", severity=2)


def test_vibration_is_continuous_across_blocks():
    a, b = Machine("press", 3), Machine("press", 3)
    whole = a.vibration(2000)
    parts = np.concatenate([b.vibration(1000), b.vibration(1000)])
    # same noise sequence is drawn per block, so compare the deterministic part: the harmonics
    assert np.corrcoef(whole, parts)[0, 1] > 0.8


def test_every_asset_has_ten_slow_tags_with_non_overlapping_registers():
    for asset, tags in ASSETS.items():
        assert len(tags) == 10 + (asset == "press"), asset  # the press counts its scrap too
        used: set[tuple[str, int]] = set()
        for t in tags:
            width = {"float32": 2, "uint32": 2}.get(t.register.type, 1)
            cells = {(t.register.table, t.register.address + i) for i in range(width)}
            assert not used & cells, (asset, t.name)
            used |= cells


def test_registers_encode_in_the_declared_word_order():
    press = {t.name: t.register for t in ASSETS["press"]}
    assert encode(123.4, press["bearing_temp"]) == [17142, 52429]
    assert encode(123.4, press["oil_temp"]) == [52429, 17142]
    assert encode(85.7, press["motor_current"]) == [857]
    assert encode(70000, press["stroke_count"]) == [1, 4464]


def test_the_adapter_config_reads_every_tag_of_every_device():
    p = DevicePath.parse("acme/pune/stamping/line-3/cell-a/press-01")
    config = adapter_config(
        [(p, "press")],
        opcua_url="opc.tcp://h:4840",
        modbus_host="h",
        modbus_port=5020,
        rate_hz=10_000,
    )
    ua = config["opcua-adapter"]
    assert ua["devices"] == [
        {"path": str(p), "template": "press", "prefix": "ns=2;s=stamping.line-3.cell-a.press-01"}
    ]
    names = [t["name"] for t in ua["templates"]["press"]]
    assert names[0] == "vibration" and len(names) == 12 and names[-1] == "scrap_count"
    node = ua["templates"]["press"][1]["node"].replace("{prefix}", ua["devices"][0]["prefix"])
    assert node == opcua_node_id(p, "bearing_temp")
    assert config["modbus-adapter"]["devices"] == []  # a press is read over OPC UA


def test_each_machine_is_read_over_one_protocol_with_the_simulator_unit_ids():
    devices = [
        (DevicePath.parse(f"acme/pune/a/l/c/{n}"), a)
        for n, a in (("press-01", "press"), ("robot-01", "robot"), ("conv-01", "conveyor"))
    ]
    config = adapter_config(
        devices, opcua_url="opc.tcp://h:4840", modbus_host="h", modbus_port=5020, rate_hz=10_000
    )
    assert [d["path"].rsplit("/", 1)[1] for d in config["opcua-adapter"]["devices"]] == [
        "press-01",
        "conv-01",
    ]
    assert config["modbus-adapter"]["devices"] == [
        {"path": "acme/pune/a/l/c/robot-01", "template": "robot", "unit_id": 2}
    ]
    assert list(config["modbus-adapter"]["templates"]) == ["robot"]
