"""The layers hold: uns imports no service, a service imports only uns, a tool declares them.

The contracts live in ``.importlinter`` and run in ``make lint``; these tests check that
they pass on the tree, that they name every package, and that a cross-import added to a
copy of the packages fails with the rule's name. A tool imports a service by the names
the service's ``__init__`` exports, not from its modules. A tool (a package under ``libs/`` other
than ``uns``, like the bench and the evaluation) may import services, but only those its
``pyproject.toml`` declares, so installing it alone brings what it needs.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import grimp
import pytest

ROOT = Path(__file__).parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@cache
def projects() -> dict[str, dict[str, Any]]:
    """Package directory (``services/featurizer``) -> its pyproject.toml."""
    return {
        str(p.parent.relative_to(ROOT)): tomllib.loads(p.read_text())
        for p in sorted(ROOT.glob("*/*/pyproject.toml"))
        if p.parts[-3] in ("libs", "services")
    }


def modules(project: dict[str, Any]) -> list[str]:
    return list(project["tool"]["setuptools"]["packages"])


def kind(home: str) -> str:
    """Everything under services/ is a service (the broker and replay too); libs/ holds
    the contract library and the tools."""
    if home == "libs/uns":
        return "contract"
    return "service" if home.startswith("services/") else "tool"


def layer(of: str) -> set[str]:
    """The importable packages of the services, the tools or the contract library."""
    return {m for h, p in projects().items() if kind(h) == of for m in modules(p)}


def contracts() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    return config


def listed(config: configparser.ConfigParser, section: str, key: str) -> list[str]:
    return config[section][key].split()


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_layer_contracts_hold_on_the_tree():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " broken" in result.stdout
    assert re.search(r"Contracts: \d+ kept, 0 broken", result.stdout)


def test_every_package_is_in_its_layer():
    """A package missing here would be checked by no contract: say which and where."""
    config = contracts()
    services, tools, everything = (
        layer("service"),
        layer("tool"),
        set().union(*map(layer, ("service", "tool", "contract"))),
    )
    assert set(listed(config, "importlinter", "root_packages")) == everything, (
        "root_packages in .importlinter must name every package under libs/ and services/"
    )
    rule = "importlinter:contract:service-imports-only-uns"
    tools_layer, services_layer = config[rule]["layers"].strip().splitlines()
    assert set(re.split(r"[:|]", services_layer.replace(" ", ""))) == services
    assert set(re.split(r"[:|]", tools_layer.replace(" ", ""))) == tools
    public = "importlinter:contract:tool-public-names"
    assert set(listed(config, public, "source_modules")) == tools
    assert set(listed(config, public, "forbidden_modules")) == {f"{s}.*" for s in services}
    forbidden = listed(config, "importlinter:contract:contract-library", "forbidden_modules")
    assert set(forbidden) == services | tools


def _distribution(name: str) -> str:
    return re.split(r"[<>=!~;\[ ]", name, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("home", sorted(h for h in projects() if kind(h) == "tool"))
def test_a_tool_declares_every_package_it_imports(home):
    """What a tool imports of ours is in its dependencies, so installing it alone works."""
    by_module = {m: p["project"]["name"] for p in projects().values() for m in modules(p)}
    graph = grimp.build_graph(*by_module, cache_dir=None)
    project = projects()[home]
    imported = set()
    for own in modules(project):
        for module in graph.find_descendants(own) | {own}:
            for other in graph.find_modules_directly_imported_by(module):
                top = other.split(".")[0]
                if top != own:
                    imported.add(by_module[top])
    declared = {_distribution(d) for d in project["project"]["dependencies"]}
    assert imported <= declared, f"{home}/pyproject.toml does not declare {imported - declared}"


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """Every package and the contracts, copied: the tests break the copy, never the tree."""
    src = tmp_path / "src"
    for home, project in projects().items():
        for module in modules(project):
            shutil.copytree(
                ROOT / home / module, src / module, ignore=shutil.ignore_patterns("__pycache__")
            )
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def _add_import(module: Path, imported: str) -> None:
    module.write_text(module.read_text() + f"\nimport {imported}  # a cross-import\n")


def test_a_service_importing_another_fails_naming_the_rule(copied):
    _add_import(copied / "src" / "uns_featurizer" / "features.py", "uns_simulator")
    result = lint_imports(copied, copied / "src")
    assert result.returncode != 0
    assert "A service imports only uns BROKEN" in result.stdout
    assert "uns_featurizer is not allowed to import uns_simulator" in result.stdout
    assert "uns_featurizer.features -> uns_simulator" in result.stdout


def test_a_tool_reaching_into_a_service_module_fails_naming_the_rule(copied):
    _add_import(copied / "src" / "uns_bench" / "load.py", "uns_simulator.physics")
    result = lint_imports(copied, copied / "src")
    assert result.returncode != 0
    assert "A tool uses a service's public names BROKEN" in result.stdout
    assert "uns_bench.load -> uns_simulator.physics" in result.stdout


def test_a_service_importing_a_tool_fails_naming_the_rule(copied):
    _add_import(copied / "src" / "uns_inference" / "service.py", "uns_eval")
    result = lint_imports(copied, copied / "src")
    assert result.returncode != 0
    assert "A service imports only uns BROKEN" in result.stdout
    assert "uns_inference is not allowed to import uns_eval" in result.stdout


def test_the_contract_library_importing_a_service_fails_naming_the_rule(copied):
    _add_import(copied / "src" / "uns" / "topics.py", "uns_bridge")
    result = lint_imports(copied, copied / "src")
    assert result.returncode != 0
    assert "The contract library imports no service BROKEN" in result.stdout
    assert "uns.topics -> uns_bridge" in result.stdout
