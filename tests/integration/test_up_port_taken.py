"""`uns up` on a box whose broker port is taken (Mosquitto installed on 1883): one line
naming the port and the two ways out, exit code 2, nothing started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration


def up(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
    return subprocess.run(
        [sys.executable, "-m", "uns", "up", "--metrics-port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def test_a_taken_broker_port_exits_2_naming_it_and_the_ways_out(taken: socket.socket) -> None:
    port = taken.getsockname()[1]
    done = up("--port", str(port))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback, no restart loop
    assert f"port {port}" in lines[0]
    assert "--port N" in lines[0] and f"--broker mqtt://127.0.0.1:{port}" in lines[0]
    assert "namespace on" not in done.stdout + done.stderr  # no service was started


def test_a_taken_cloud_port_exits_2_naming_it(taken: socket.socket) -> None:
    port = taken.getsockname()[1]
    done = up("--broker", "mqtt://127.0.0.1:1", "--cloud-port", str(port))
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "--cloud-port" in done.stderr
