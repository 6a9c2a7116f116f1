"""The asset graph's relations in plant.yaml: optional, and checked when the config loads."""

import subprocess
import sys

import pytest

from uns import ConfigError, load
from uns.config import EXAMPLE_CONFIG

LINE = "acme/pune/stamping/line-3"


def plant(tmp_path, devices: str):
    f = tmp_path / "plant.yaml"
    f.write_text("plant:\n  devices:\n" + devices, encoding="utf-8")
    return f


def test_feeds_and_criticality_are_read_and_default_to_none_and_medium(tmp_path):
    f = plant(
        tmp_path,
        f"    - {{path: {LINE}/cell-a/press-01, asset: press, feeds: [{LINE}/cell-b/robot-01],"
        " criticality: critical}\n"
        f"    - {{path: {LINE}/cell-b/robot-01, asset: robot}}\n",
    )
    press, robot = load(f, environ={}).config.plant.devices
    assert press.feeds == [f"{LINE}/cell-b/robot-01"] and press.criticality == "critical"
    assert robot.feeds == [] and robot.criticality == "medium"


def test_the_example_plant_still_loads():
    assert load(EXAMPLE_CONFIG, environ={}).config.plant.devices


def test_an_unknown_fed_device_is_named_by_its_entry(tmp_path):
    f = plant(
        tmp_path,
        f"    - {{path: {LINE}/cell-a/press-01, asset: press}}\n"
        f"    - {{path: {LINE}/cell-a/press-02, asset: press, feeds: [{LINE}/cell-z/ghost]}}\n",
    )
    with pytest.raises(ConfigError, match=r"plant\.devices\[1\]\.feeds\[0\].*cell-z/ghost"):
        load(f, environ={})


def test_a_cycle_in_feeds_is_named(tmp_path):
    a, b, c = (f"{LINE}/cell-a/press-0{i}" for i in (1, 2, 3))
    f = plant(
        tmp_path,
        f"    - {{path: {a}, asset: press, feeds: [{b}]}}\n"
        f"    - {{path: {b}, asset: press, feeds: [{c}]}}\n"
        f"    - {{path: {c}, asset: press, feeds: [{a}]}}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load(f, environ={})
    assert "plant.devices[0].feeds: a cycle" in str(caught.value)
    assert f"{a} -> {b} -> {c} -> {a}" in str(caught.value)


def test_a_device_feeding_itself_is_a_cycle(tmp_path):
    a = f"{LINE}/cell-a/press-01"
    f = plant(tmp_path, f"    - {{path: {a}, asset: press, feeds: [{a}]}}\n")
    with pytest.raises(ConfigError, match=r"plant\.devices\[0\]\.feeds: a cycle"):
        load(f, environ={})


def test_bad_relations_exit_with_code_2(tmp_path):
    a = f"{LINE}/cell-a/press-01"
    f = plant(tmp_path, f"    - {{path: {a}, asset: press, feeds: [{LINE}/cell-a/nope]}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "demo", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "plant.devices[0].feeds[0]" in result.stderr and "Traceback" not in result.stderr
