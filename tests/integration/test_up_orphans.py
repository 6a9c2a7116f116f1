"""`uns up` killed with SIGKILL (the OOM killer, a `kill -9`, a crashed terminal): its
children end too, each stopping cleanly, instead of living on orphaned with their ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.ports import free_port

pytestmark = pytest.mark.integration

DEMO_ONLY = Path(__file__).parent / "demo-only.yaml"
UP = (sys.executable, "-m", "uns", "up")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)
    return value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_the_services_of_a_killed_uns_up_end_with_it() -> None:
    assert DEMO_ONLY.exists(), "the demo-only config the CLI tests use"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
    up = subprocess.Popen(
        [*UP, "--port", str(free_port()), "--metrics-port", "0", "--config", str(DEMO_ONLY)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kids: list[int] = []
    try:
        kids = until(lambda: len(children(up.pid)) >= 2 and children(up.pid), 60, "broker+demo")
        up.send_signal(signal.SIGKILL)
        up.wait(10)
        until(lambda: not any(alive(k) for k in kids), 30, "end of the orphaned children")
    finally:
        if up.poll() is None:
            kids = kids or children(up.pid)
            up.kill()
        for k in kids:  # what a failed run would leave behind
            if alive(k):
                os.kill(k, signal.SIGKILL)
