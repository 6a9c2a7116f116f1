"""The system suite's fixtures: one running plant for the whole session, and the report.

Every test here is marked ``system`` (and ``mosquitto``). Long cases are also marked
``system_long`` and run only when asked for: ``-m system_long`` or ``UNS_SYSTEM_LONG=1``.

The measurements of a run go to ``var/system-report.json`` (``UNS_SYSTEM_REPORT``
overrides the path); `tests/system/report.py` turns that file into RELIABILITY.md's table.
The run's files (config, logs of `uns up` and both brokers, journal, audit log) are kept in
``var/system-runs/<time>-<pid>/`` (the last three runs; ``UNS_SYSTEM_DIR`` to choose one).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI
from fixtures.brokers import mosquitto_binary
from system.plant import ROOT, System

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "system_long: a long system case (minutes); runs with -m system_long or UNS_SYSTEM_LONG=1",
    )


def _long_selected(config: pytest.Config) -> bool:
    return "system_long" in (config.option.markexpr or "") or bool(
        os.environ.get("UNS_SYSTEM_LONG")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_long = pytest.mark.skip(reason="long system case: -m system_long or UNS_SYSTEM_LONG=1")
    for item in items:
        if HERE not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.system)
        item.add_marker(pytest.mark.mosquitto)
        if item.get_closest_marker("system_long") and not _long_selected(config):
            item.add_marker(skip_long)


class Report:
    """Measurements of one run, by case; written as JSON at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.cases: dict[str, dict[str, Any]] = {}
        self.machine = {
            "nproc": os.cpu_count(),
            "loadavg_at_start": _loadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "ci": IN_CI,
        }

    def add(self, case: str, **figures: Any) -> dict[str, Any]:
        entry = self.cases.setdefault(case, {"runs": 0})
        entry.update(figures)
        return entry

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.machine["loadavg_at_end"] = _loadavg()
        data = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "machine": self.machine,
            "cases": self.cases,
        }
        self.path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _run_dir(keep: int = 3) -> Path:
    """A directory of its own for this run (another session may run beside it), the
    oldest ones beyond ``keep`` removed."""
    if os.environ.get("UNS_SYSTEM_DIR"):
        path = Path(os.environ["UNS_SYSTEM_DIR"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    runs = ROOT / "var" / "system-runs"
    path = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True)
    for old in sorted(runs.iterdir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    path = Path(os.environ.get("UNS_SYSTEM_REPORT") or ROOT / "var" / "system-report.json")
    r = Report(path)
    yield r
    r.write()


@pytest.fixture(scope="session")
def system(report: Report) -> Iterator[System]:
    """The example plant under `uns up`, up and scoring, for the whole session."""
    if mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None:
        if IN_CI:
            pytest.fail(
                "mosquitto (and mosquitto_passwd) is not installed; .ci/run must install it"
            )
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = _run_dir()
    plant = System(workdir)
    try:
        plant.start_up()
        started = plant.started_at
        took = plant.wait_flowing(started, timeout=240)
        plant.mark_startup()
        report.add("startup", runs=1, **took)
        yield plant
    finally:
        code = plant.stop_up()
        report.add("shutdown", exit_code=code, restarts=plant.restarts())
        plant.close()
        report.machine["workdir"] = str(plant.dir)


@pytest.fixture
def plant(system: System) -> System:
    """The plant, healthy: every service online and the pipeline flowing (a previous case
    may have left it recovering). Once it did not recover, later cases wait less long for
    it (each fails at once instead of adding three minutes to the run)."""
    timeout = 30 if system.unhealthy else 180
    try:
        system.wait_flowing(time.time() - 5, timeout=timeout, births_since=system.started_at)
    except AssertionError as exc:
        system.unhealthy = True
        pytest.fail(f"the plant is not healthy: {exc}")
    system.unhealthy = False
    return system
