"""Services and command groups plug in through entry points, and finding them is light.

`uns --help`, `uns up` and a config check list the installed packages from their
metadata and load only their settings modules: no service's heavy libraries (asyncua,
pymodbus, numpy, onnxruntime) are imported for them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uns import plugins

HEAVY = ("asyncua", "pymodbus", "numpy", "onnxruntime")
PLANT = Path(__file__).parents[2] / "uns-schema" / "plant.yaml"
GROUPS = ("audit", "bench", "broker", "model", "opcua", "record", "replay", "sim")
PORTS = {
    "demo": 9400,
    "opcua-adapter": 9401,
    "modbus-adapter": 9402,
    "simulator": 9403,
    "bridge": 9404,
    "featurizer": 9405,
    "inference": 9406,
}


def imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported once ``code`` ran."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def uns(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uns", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_importing_the_cli_and_listing_the_services_imports_no_service() -> None:
    modules = imported_after(
        "import uns.cli, uns.plugins\n"
        "found = uns.plugins.services()\n"
        "assert found and uns.plugins.commands()\n"
        "[(p.service_ref, p.settings_ref) for p in found.values()]"
    )
    assert not {m for m in modules if m.startswith("uns_")}
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def test_every_services_settings_load_from_the_example_plant_without_heavy_libraries() -> None:
    modules = imported_after(
        "import uns, uns.plugins\n"
        f"loaded = uns.load({str(PLANT)!r}, environ={{}})\n"
        "for name, plugin in uns.plugins.services().items():\n"
        "    assert loaded.service(name, plugin.load_settings()).enabled in (True, False)\n"
        "    assert plugin.default_metrics_port > 0"
    )
    assert {m.split(".")[0] for m in modules} >= {"uns_opcua_adapter", "uns_inference"}
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    assert not {m for m in modules if m.startswith("uns_") and m.endswith(".service")}


def test_each_service_declares_its_settings_and_its_default_metrics_port() -> None:
    found = plugins.services()
    assert {name: found[name].default_metrics_port for name in PORTS} == PORTS
    for name, plugin in found.items():
        assert plugin.settings_ref is not None, name
        assert plugin.load_service().Settings is plugin.load_settings(), name


def test_uns_help_lists_the_own_commands_and_every_installed_group() -> None:
    r = uns("--help")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ")}
    assert listed >= {"run", "up", "sub", "tree", "pub", "schema", *GROUPS}
    assert set(plugins.commands()) >= set(GROUPS)


@pytest.mark.parametrize(
    "command",
    [
        ("sim", "fault"),
        ("sim", "plant"),
        ("opcua", "browse"),
        ("opcua", "cert"),
        ("model", "train"),
        ("model", "promote"),
        ("audit", "verify"),
        ("record",),
        ("replay",),
        ("broker",),
        ("broker", "passwd"),
        ("bench",),
    ],
)
def test_a_command_of_a_package_shows_its_help(command: tuple[str, ...]) -> None:
    r = uns(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert f" uns {' '.join(command)} [OPTIONS]" in r.stdout


def test_uns_run_of_an_unknown_service_names_the_installed_ones() -> None:
    r = uns("run", "no-such-service")
    assert r.returncode == 2
    assert "no service named 'no-such-service'; installed: bridge, broker, demo" in r.stderr


@pytest.mark.parametrize(
    "package",
    [
        "uns_bench",
        "uns_bridge",
        "uns_broker",
        "uns_demo",
        "uns_featurizer",
        "uns_inference",
        "uns_modbus_adapter",
        "uns_opcua_adapter",
        "uns_replay",
        "uns_simulator",
    ],
)
def test_a_packages_public_names_all_resolve(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_a_settings_module_comes_without_its_service() -> None:
    modules = imported_after("import uns_bridge.settings, uns_opcua_adapter.settings")
    assert "uns_bridge.service" not in modules and "uns_opcua_adapter.ua" not in modules


def test_the_training_options_have_one_default_everywhere() -> None:
    from uns_inference import TRAINING, model_train, train

    for fn in (model_train, train.fit_anomaly, train.fit_rul):
        for name, param in inspect.signature(fn).parameters.items():
            option = {"cap": "rul_cap"}.get(name, name)
            if hasattr(TRAINING, option) and param.default is not inspect.Parameter.empty:
                assert param.default == getattr(TRAINING, option), (fn.__name__, name)
    for card in (PLANT.parents[1] / "models").glob("*/anomaly/*/card.json"):
        parameters = json.loads(card.read_text())["training"]["parameters"]
        assert parameters["margin"] == TRAINING.margin, card  # the shipped models' margin
