"""CONTRIBUTING.md's walk-throughs, followed literally: its files are written into a
scratch directory as the page shows them, installed as a package, and the commands the page
runs find the new service and its command group. No file of the repository is edited to
make the new service appear: entry points alone plug it in."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from uns import Command, DeviceBirth, DeviceData, NodeBirth
from uns.testing import watching

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "CONTRIBUTING.md"
DEVICE = "acme/pune/hello/line-0/cell-0/hello-01"
FILE_BLOCK = re.compile(r"^```\w+ (services/hello/\S+)\n(.*?)^```", re.S | re.M)
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)

PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The guide's package written and installed (into a directory of its own on
    PYTHONPATH, not into the repository's environment); the environment to run `uns` in."""
    scratch = tmp_path_factory.mktemp("contributing")
    files = FILE_BLOCK.findall(GUIDE.read_text())
    assert {path for path, _ in files} >= {
        "services/hello/pyproject.toml",
        "services/hello/uns_hello/settings.py",
        "services/hello/uns_hello/service.py",
        "services/hello/uns_hello/cli.py",
        "services/hello/tests/test_hello.py",
    }
    for path, body in files:
        target = scratch / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    site = scratch / "site"
    package = str(scratch / "services" / "hello")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), package],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return {"cwd": str(scratch), **env}


def uns(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cwd = env["cwd"]
    return subprocess.run(
        [sys.executable, "-m", "uns", *args],
        cwd=cwd,
        env={k: v for k, v in env.items() if k != "cwd"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_guide_runs_the_commands_this_test_checks() -> None:
    commands = [
        line.strip()
        for block in SHELL_BLOCK.findall(GUIDE.read_text())
        for line in block.splitlines()
    ]
    assert commands == [
        "make install",
        ".venv/bin/uns up --plan",
        ".venv/bin/uns run hello --help",
        ".venv/bin/python -m pytest -q services/hello/tests",
        ".venv/bin/uns hello show",
    ]


def test_a_new_service_is_in_uns_help_and_in_the_plan_of_uns_up(hello: dict[str, str]) -> None:
    listed = uns(hello, "--help")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"hello\s+The hello service\.", listed.stdout)

    plan = uns(hello, "up", "--plan")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"^hello\s+metrics port 9499$", plan.stdout, re.M), plan.stdout

    run_help = uns(hello, "run", "hello", "--help")
    assert run_help.returncode == 0, run_help.stderr


def test_its_command_group_reads_its_settings_and_names_a_wrong_field(
    hello: dict[str, str], tmp_path: Path
) -> None:
    shown = uns(hello, "hello", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "hello on line-0, at most 1000 pokes"

    bad = tmp_path / "plant.yaml"
    bad.write_text(
        (ROOT / "uns-schema" / "plant.yaml").read_text()
        + "\n  hello:\n    max_pokes: 0\n"  # the services: mapping is the file's last
    )
    refused = uns(hello, "hello", "show", "--config", str(bad))
    assert refused.returncode == 2
    assert "max_pokes" in refused.stderr


def test_its_own_test_passes_with_uns_testing(hello: dict[str, str]) -> None:
    done = subprocess.run(
        [
            *PYTEST,
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            hello["cwd"],
            "services/hello/tests",
        ],
        cwd=hello["cwd"],
        env={k: v for k, v in hello.items() if k != "cwd"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


async def test_uns_run_hello_is_born_and_obeys_a_poke(hello: dict[str, str], amqtt_broker) -> None:
    env = {k: v for k, v in hello.items() if k != "cwd"}
    async with watching(amqtt_broker.url, "acme/#") as w:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "uns", "run", "hello", "--broker", amqtt_broker.url],
            *["--metrics-port", "0"],
            cwd=hello["cwd"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            node = await w.next("acme/pune/_node/hello/birth", NodeBirth, timeout=60)
            birth = await w.next(f"{DEVICE}/raw/birth", DeviceBirth, timeout=30)
            await w.publish(f"{DEVICE}/cmd/poke", Command(ts=1, name="poke"))
            data = await w.next(f"{DEVICE}/raw/data", DeviceData, timeout=30)
        finally:
            proc.terminate()
            await proc.wait()
    assert node.node == "hello"
    assert [m.name for m in birth.metrics] == ["pokes"]
    assert [m.value for m in data.metrics] == [1]
