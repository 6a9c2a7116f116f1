"""A server port another program holds (the simulator's, a service's metrics): one line
naming the setting, exit code 2, no traceback (the simulator once crashed with an exception
group while its adapter retried forever)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration
UNS = (sys.executable, "-m", "uns")


@pytest.fixture
def taken() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def refused_line(*args: str, env: dict[str, str] | None = None) -> str:
    """``uns run ...`` with none of this machine's UNS_ variables: it exits 2 without a
    traceback; its last line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
    done = subprocess.run(
        [*UNS, "run", *args, "--broker", "memory://ports"],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("server", ["opcua", "modbus"])
def test_a_taken_server_port_exits_2_naming_the_setting(server: str, taken: int) -> None:
    other = "MODBUS" if server == "opcua" else "OPCUA"
    env = {
        f"UNS_SERVICES__SIMULATOR__{server.upper()}__PORT": str(taken),
        f"UNS_SERVICES__SIMULATOR__{other}__ENABLED": "false",
    }
    last = refused_line("simulator", "--metrics-port", "0", env=env)
    assert last.startswith(f"error: config: simulator.{server}.port: cannot listen on")
    assert str(taken) in last


def test_a_taken_metrics_port_exits_2_naming_the_setting(taken: int) -> None:
    """Two instances of a service on one box with the same metrics port (or another
    program on it): the second says which setting, rather than a traceback."""
    last = refused_line("demo", "--metrics-port", str(taken))
    assert last.startswith("error: config: services.demo.metrics_port: cannot serve /metrics on")
    assert f"127.0.0.1:{taken}: Address already in use" in last
