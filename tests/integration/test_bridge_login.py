"""The bridge against a remote Mosquitto that refuses its login (a password file).

Retrying a refused login every few seconds locks the account on many brokers and
identity providers: the bridge must back off far longer, say why, keep the journal, and
get through at its next attempt once the secret is right (the password file is re-read
at every connect, so fixing it needs no restart).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.brokers import Mosquitto, started_mosquitto
from fixtures.logs import capturing_logs
from uns import DeviceData, Metric, connect, encode
from uns.config import BrokerSettings
from uns.testing import Watcher, running, watching
from uns_bridge import Bridge

pytestmark = pytest.mark.integration

FEATURES_ONLY = ["+/+/+/+/+/+/features/#"]


@pytest.fixture
def locked_cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    """A remote that admits only its users: ``edge`` (password ``right``) and ``reader``."""
    broker = started_mosquitto(tmp_path, users={"edge": "right", "reader": "reader"})
    yield broker
    broker.kill()


@contextlib.asynccontextmanager
async def reading(url: str) -> AsyncIterator[Watcher]:
    """The cloud application: every features message that reaches the remote."""
    settings = BrokerSettings(url=url, username="reader", password="reader")
    async with watching(None, "+/+/+/+/+/+/features/#", settings=settings) as reader:
        reader.timeout = 20.0
        yield reader


async def produce(url: str, prefix: str, n: int) -> None:
    async with connect(url) as plant:
        for i in range(n):
            topic = f"{prefix}/pune/stamping/line-3/cell-a/press-01/features/data"
            data = DeviceData(ts=int(time.time() * 1000), node="f", seq=i, metrics=[Metric("n", i)])
            await plant.publish(topic, encode(data), qos=1)


def wait_of(record: logging.LogRecord) -> float:
    found = re.search(r"next attempt in ([\d.]+) s", record.getMessage())
    assert found, record.getMessage()
    return float(found[1])


def metric(node: Any, name: str) -> float:
    return float(node.metrics.registry.get_sample_value(name, {"service": "bridge"}) or 0.0)


async def test_a_refused_login_backs_off_far_longer_says_why_and_a_fixed_password_gets_through(
    locked_cloud: Mosquitto, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    secret = tmp_path / "bridge.secret"
    secret.write_text("wrong\n")
    login_min, login_max = 1.5, 4.0  # production defaults: 60 s doubling to 30 min
    remote = {
        "url": locked_cloud.url,
        "allow_plaintext": True,
        "username": "edge",
        "password_file": str(secret),
        "reconnect_min_s": 0.1,  # what any other failure would be retried after
        "reconnect_max_s": 0.5,
        "login_retry_min_s": login_min,
        "login_retry_max_s": login_max,
    }
    with capturing_logs("uns_bridge", timeout=20) as logs:

        def refusals() -> list[logging.LogRecord]:
            return [r for r in logs.of("uns_bridge") if "refused our login" in r.getMessage()]

        async with (
            reading(locked_cloud.url) as cloud,
            running(
                Bridge,
                memory_url,
                prefix,
                remote=remote,
                include=FEATURES_ONLY,
                journal={"path": str(tmp_path / "journal.sqlite")},
            ) as node,
        ):
            await produce(memory_url, prefix, 10)
            await logs.wait(lambda: len(refusals()) >= 2)
            refused = metric(node, "uns_bridge_login_refusals_total")
            secret.write_text("right\n")  # the operator fixes the secret
            await cloud.wait(lambda: len(cloud.messages) == 10)
            assert metric(node, "uns_bridge_remote_connected") == 1

    first, second = refusals()[:2]
    text = first.getMessage()
    assert "the remote refused our identity" in text and "Not authorized" in text
    assert "remote.login_retry_min_s" in text  # names the setting that sets the wait
    assert first.levelno == logging.ERROR and first.exc_info is None
    waits = [wait_of(r) for r in (first, second)]  # as logged: rounded to 0.1 s
    assert login_min * 0.8 - 0.05 <= waits[0] <= login_min * 1.2 + 0.05
    assert 2 * login_min * 0.8 - 0.05 <= waits[1] <= login_max * 1.2 + 0.05, "doubling"
    # the second attempt really waited (a lower bound: a loaded machine only adds to it)
    assert second.created - first.created >= waits[0] * 0.95
    assert refused >= 2
    attempts = [
        r
        for r in logs.of("uns_bridge")
        if "refused" in r.getMessage() or "retrying" in r.getMessage()
    ]
    assert attempts == refusals(), "no quick retries between the refusals"
    assert "messages kept in the journal" in text
