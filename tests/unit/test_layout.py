"""The repository's one list of packages, and what must follow it.

A package is a directory with a ``pyproject.toml`` under ``libs/`` or ``services/``;
a service package is one declaring an ``uns.services`` entry point there. Nothing names
them by hand but the files a deployment needs per service (a compose container, a
Prometheus target) and the README: these tests say what drifted, and where.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def packages() -> list[Path]:
    return sorted(p.parent for p in ROOT.glob("*/*/pyproject.toml") if p.parts[-3] in _HOMES)


_HOMES = ("libs", "services")


def service_packages() -> dict[str, Path]:
    """Service name -> its package directory, from each package's own pyproject.toml."""
    found: dict[str, Path] = {}
    for package in packages():
        project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
        for name in project.get("entry-points", {}).get("uns.services", {}):
            found[name] = package
    return found


def default_metrics_port(name: str) -> int:
    """The installed service's default ``/metrics`` port, a ClassVar of its settings class
    (``uns.settings``, else the service class's ``Settings``; once the service class's)."""
    classes = [ep.load() for ep in entry_points(group="uns.settings", name=name)]
    for ep in entry_points(group="uns.services", name=name):
        service = ep.load()
        classes += [service.Settings, service]
    for cls in classes:
        if port := getattr(cls, "default_metrics_port", 0):
            return int(port)
    raise AssertionError(f"{name}: no default_metrics_port on its settings or service class")


@cache
def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return spec


def test_services_are_found():
    names = service_packages()
    assert {"simulator", "opcua-adapter", "featurizer", "inference", "bridge"} <= set(names)
    assert all(p.parent.name == "services" for p in names.values())


def test_the_image_installs_every_package():
    """The Dockerfile's pip line, expanded by a shell in the build context as the image's
    shell expands it (globs, command substitution)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "pip install" in line]
    assert len(lines) == 1, "the Dockerfile should install the packages with one pip line"
    words = lines[0].split("pip install", 1)[1].split("&&", 1)[0]
    out = subprocess.run(
        ["sh", "-c", f"printf '%s\\n' {words}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    installed = {(ROOT / w).resolve() for w in out.split() if not w.startswith("-")}
    missing = [str(p.relative_to(ROOT)) for p in packages() if p.resolve() not in installed]
    assert not missing, f"the Dockerfile does not install {missing}"


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_every_service_has_a_compose_container(name):
    runs = [
        key for key, spec in compose().items() if (spec.get("command") or [])[:2] == ["run", name]
    ]
    assert runs, (
        f"docker-compose.yml has no service running `uns run {name}` (put one disabled in"
        " the example plant behind a profile, like the demo)"
    )


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_every_service_is_scraped_at_its_default_metrics_port(name):
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    port = default_metrics_port(name)
    for key, spec in compose().items():
        command = spec.get("command") or []
        if command[:2] != ["run", name]:
            continue
        if "--metrics-port" in command:
            given = int(command[command.index("--metrics-port") + 1])
            assert given == port, f"docker-compose.yml runs {key} on {given}, its default is {port}"
        if spec.get("profiles"):
            continue  # not started by default: no target to be down
        assert f"{key}:{port}" in targets, (
            f"deploy/prometheus/prometheus.yml does not scrape {key}:{port}"
        )


def _readme_layout() -> list[str]:
    """The paths the README's Layout section lists (first column of its code block)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("\n## Layout\n", 1)[1].split("```", 2)[1]
    listed: list[str] = []
    for line in block.splitlines():
        if not line or line[0].isspace():
            continue  # a description going on
        paths = re.match(r"[^\s,]+(?:,\s*[^\s,]+)*", line)
        assert paths, line
        listed += [p.strip() for p in paths.group().split(",")]
    return listed


def test_the_readme_layout_lists_every_package_and_only_what_exists():
    listed = _readme_layout()
    absent = [p for p in listed if not (ROOT / p).exists()]
    assert not absent, f"README.md's Layout lists what is not there: {absent}"
    unlisted = [
        str(p.relative_to(ROOT)) + "/"
        for p in packages()
        if str(p.relative_to(ROOT)) + "/" not in listed
    ]
    assert not unlisted, f"README.md's Layout does not list {unlisted}"


# ---- pre-commit runs what `make lint` runs -------------------------------------------------


def _make_lint() -> list[list[str]]:
    """The commands of `make lint`, as make would run them (tools under BIN/; the install
    stamp taken as made, so no install is shown)."""
    out = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            "lint",
            "BIN=BIN",
            "STAMP=no-install",
            "-o",
            "no-install",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.startswith("BIN/")]


def _pins() -> dict[str, str]:
    text = (ROOT / "requirements-dev.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M))


def test_pre_commit_runs_the_lint_of_the_makefile():
    hooks = [
        hook
        for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for hook in repo["hooks"]
    ]
    from_hooks = []
    for hook in hooks:
        argv = shlex.split(hook["entry"])
        argv[0] = Path(argv[0]).name  # language: system names .venv/bin/TOOL
        if hook.get("pass_filenames", True):
            dirs = re.fullmatch(r"\^\(([\w|-]+)\)/", hook.get("files", ""))
            assert dirs, f"hook {hook['id']}: files should be ^(dir|dir|...)/"
            argv += dirs.group(1).split("|")
        from_hooks.append(argv)
        for dep in hook.get("additional_dependencies", []):
            name, version = dep.split("==")
            assert _pins().get(name) == version, f"hook {hook['id']}: {dep}, the pin differs"
    from_make = [[Path(argv[0]).name, *argv[1:]] for argv in _make_lint()]
    assert from_make, "make -n lint shows no command"
    missing = [" ".join(c) for c in from_make if c not in from_hooks]
    extra = [" ".join(c) for c in from_hooks if c not in from_make]
    assert not missing, f".pre-commit-config.yaml has no hook running {missing} (make lint does)"
    assert not extra, f".pre-commit-config.yaml runs {extra}, which make lint does not"
