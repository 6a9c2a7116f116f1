"""`uns bench --quick` measures every scenario without losing a message (correctness only:
the machines are shared and noisy, so no figure is held to a target here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from clitools import uns
from fixtures.brokers import need_mosquitto

pytestmark = pytest.mark.integration

SCENARIOS = (
    "1 broker ceiling",
    "2 vibration",
    "3 slow tags",
    "4 sensor to alert",
    "5 bridge",
    "6 example plant",
    "7 sparkplug",
    "8 boxes",
)


@pytest.fixture
def loaded_machine() -> Iterator[None]:
    """One niced busy loop per core: the harness must not depend on an idle machine (a
    scenario that measures before its source publishes data reports 0/s under load)."""
    burners = [
        subprocess.Popen(
            [sys.executable, "-c", "import os; os.nice(10)\nwhile True: pass"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.timeout(400)
def test_a_quick_bench_reports_every_scenario_with_nothing_lost(tmp_path, loaded_machine):
    need_mosquitto()
    out = tmp_path / "bench.json"
    r = uns("bench", "--quick", "--json", str(out), timeout=380)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| scenario | case |" in r.stdout  # the Markdown table
    document = json.loads(out.read_text())
    assert document["machine"]["cpus"] >= 1
    results = document["results"]
    assert {row["scenario"] for row in results} == set(SCENARIOS)
    for row in results:
        assert row["lost"] == 0, row
        rates = {k: v for k, v in row["figures"].items() if "/s" in k}
        assert all(v > 0 for v in rates.values()), row
    vibration = next(row for row in results if row["scenario"] == "2 vibration")
    assert vibration["figures"]["scores"] == vibration["figures"]["windows expected"] > 0
    # every rate through a broker against both ceilings of this run's broker scenario
    rated = [row for row in results if row["rate"]]
    assert {row["scenario"] for row in rated} == {
        "2 vibration",
        "3 slow tags",
        "5 bridge",
        "8 boxes",
    }
    for row in rated:
        assert set(row["of_ceiling"]) == {"amqtt", "mosquitto"}, row
        assert all(v is not None and v > 0 for v in row["of_ceiling"].values()), row
    assert document["ceiling_source"] == "broker scenario"
    plant = next(row for row in results if row["scenario"] == "6 example plant")
    assert plant["figures"]["RSS sum MB"] > 0


@pytest.mark.timeout(300)
def test_machine_levels_give_a_row_each_and_the_knee_or_its_absence(tmp_path):
    need_mosquitto()
    out = tmp_path / "bench.json"
    r = uns(
        *("bench", "vibration", "--machines", "4,2", "--brokers", "amqtt,mosquitto", "--quick"),
        *("--json", str(out)),
        timeout=280,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    document = json.loads(out.read_text())
    rows = document["results"]
    assert [(row["case"], row["level"]) for row in rows] == [
        ("2 machines", 2),
        ("4 machines", 4),
        ("2 machines on Mosquitto", 2),
        ("4 machines on Mosquitto", 4),
    ]
    assert all(row["limits"] == {"latency p99 ms": 50.0} for row in rows)
    assert all(row["lost"] == 0 for row in rows[2:]), rows  # the pipeline on Mosquitto
    # the ceilings measured for the ratios, the broker scenario not being in the run
    assert document["ceiling_source"] == "quick"
    assert all(set(row["of_ceiling"]) == {"amqtt", "mosquitto"} for row in rows)
    # the report says, for each broker, where the pipeline stopped keeping up or that it
    # never did
    assert len(document["knees"]) == 2
    for series, verdict in zip(("amqtt", "Mosquitto"), document["knees"]):
        knees = [row["level"] for row in rows if row["knee"] and series in row["series"]]
        if knees:
            assert verdict.startswith(f"knee of 2 vibration, {series}: {knees[0]} machines")
        else:
            assert verdict.startswith(f"no knee in 2 vibration, {series}: nothing lost")
            assert verdict.endswith("up to 4 machines"), verdict
        assert f"- {verdict}" in r.stdout
    assert any("**(knee)** |" in line for line in r.stdout.splitlines()) == any(
        row["knee"] for row in rows
    )


@pytest.mark.parametrize("levels", ["0", "2,-1", "two", "2,,4"])
def test_a_machine_level_that_is_not_a_count_exits_2_naming_the_option(levels):
    r = uns("bench", "vibration", "--machines", levels, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--machines" in r.stderr


@pytest.mark.parametrize("args", [["--boxes", "0"], ["--boxes", "ten"], ["--box-machines", "0"]])
def test_a_box_count_that_is_not_a_count_exits_2_naming_the_option(args):
    r = uns("bench", "boxes", *args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--boxes" in r.stderr


def test_a_broker_the_harness_cannot_start_exits_2_naming_the_option():
    r = uns("bench", "vibration", "--brokers", "amqtt,rabbit", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--brokers" in r.stderr and "rabbit" in r.stderr
