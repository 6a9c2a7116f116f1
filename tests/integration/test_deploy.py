"""The deployment files, checked with the real programs (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.brokers import Mosquitto
from fixtures.need import missing

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        missing(f"{program} is not installed", ci=".ci/run must install it")
    return path


def test_the_compose_file_is_valid():
    result = subprocess.run(
        [need("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_compose_service_runs_a_service_that_exists():
    import yaml

    from uns.plugins import service_classes

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, spec in compose["services"].items():
        command = spec.get("command")
        if command and command[0] == "run":
            assert command[1] in service_classes(), name


def test_the_compose_mosquitto_config_starts_a_working_broker(tmp_path):
    need("mosquitto")
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    conf = conf.replace("listener 1883", "").replace("/mosquitto/data/", f"{tmp_path}/")
    conf = conf.replace("log_dest stdout", "")
    broker = Mosquitto(tmp_path, extra=conf.replace("allow_anonymous true", ""))
    broker.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "uns", "sub", "#", "--timeout", "0.5", "--broker", broker.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "never reached" not in r.stderr
    finally:
        broker.kill()
