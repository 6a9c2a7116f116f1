"""Fixtures: real brokers on free ports (amqtt in-process, Mosquitto as a subprocess); the
helpers behind them are in `fixtures` (tests/fixtures), what a service's test needs in
`uns.testing`."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.brokers import AmqttBroker, Mosquitto, started_mosquitto
from fixtures.need import IN_CI
from fixtures.ports import free_port
from uns.membus import MemoryBroker
from uns.testing import memory_url as new_memory_url

# Imported here, not lazily inside a test: pytest rewrites hypothesis's modules (it is a
# plugin), and on Python 3.11.7 rewriting (parsing) one while hypothesis runs a test deep in
# its own stack can fail with "SystemError: AST constructor recursion depth mismatch" (seen
# in whole-suite runs, never alone: `st.from_regex`'s module, then the optimiser's under
# pytest-xdist). These are the modules hypothesis imports inside its functions.
for _lazy in (
    "hypothesis.strategies._internal.regex",
    "hypothesis.internal.conjecture.optimiser",
    "hypothesis.internal.conjecture.provider_conformance",
    "hypothesis.internal.scrutineer",
    "hypothesis.internal.observability",
    "hypothesis.internal.constants_ast",
    "hypothesis.stateful",
    "hypothesis.vendor.pretty",
    "hypothesis.extra.numpy",
    "hypothesis.provisional",
    "hypothesis.utils.terminal",
):
    importlib.import_module(_lazy)

# The clustered engines (issue 14), each in its own module: `rabbitmq_cluster`, `nats_mqtt`.
pytest_plugins = ["fixtures.rabbitmq", "fixtures.nats"]


@pytest.fixture
def prefix() -> str:
    """A unique top level, so tests sharing a broker never see each other's topics."""
    return f"t{uuid.uuid4().hex[:10]}"


# ---- in-memory -----------------------------------------------------------------------


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = new_memory_url()
    yield url
    MemoryBroker._registry.pop(url.removeprefix("memory://"), None)


# ---- amqtt, in-process -------------------------------------------------------------------


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[AmqttBroker]:
    broker = AmqttBroker(free_port())
    await broker.start()
    yield broker
    await broker.stop()


# ---- Mosquitto, a subprocess --------------------------------------------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = started_mosquitto(tmp_path)
    yield broker
    broker.kill()


# ---- the same tests on every broker -------------------------------------------------------


@pytest.fixture(
    params=[
        "memory",
        "amqtt",
        "mosquitto",
        # one worker per engine under pytest-xdist (make test), so each starts once
        pytest.param("rabbitmq", marks=pytest.mark.xdist_group("rabbitmq")),
        pytest.param("nats", marks=pytest.mark.xdist_group("nats")),
    ]
)
async def any_broker(request: pytest.FixtureRequest, memory_url: str) -> AsyncIterator[str]:
    """The URL of each kind of broker in turn: the contract must hold on all of them.

    ``rabbitmq`` is a node of a three-node cluster, ``nats`` NATS's MQTT listener: both
    are started once per session (tests/fixtures/rabbitmq.py, tests/fixtures/nats.py)."""
    if request.param == "rabbitmq":
        yield request.getfixturevalue("rabbitmq_cluster").url
    elif request.param == "nats":
        yield request.getfixturevalue("nats_mqtt").url
    elif request.param == "memory":
        yield memory_url
    elif request.param == "amqtt":
        broker = AmqttBroker(free_port())
        await broker.start()
        try:
            yield broker.url
        finally:
            await broker.stop()
    else:
        yield request.getfixturevalue("mosquitto").url


# ---- real machine data (../shared/data, never copied into the repository) -----------------


@pytest.fixture
def datasets() -> Path:
    """``UNS_DATASETS``: skipped where unset on a user's machine, a failure in CI."""
    root = os.environ.get("UNS_DATASETS")
    if not root:
        if IN_CI:
            pytest.fail("UNS_DATASETS is not set; .ci/run sets it to ../shared/data")
        pytest.skip("UNS_DATASETS is not set (the real data sets live outside the repository)")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"UNS_DATASETS={root} is not a directory")
    return path


# ---- `uns` processes ----------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Background `uns` processes of a test, killed after it."""
    import signal

    started: list[Any] = []
    yield started
    for p in reversed(started):  # politely first: `uns up` then stops its children
        try:
            p.stop(signal.SIGTERM)
        except Exception:
            p.stop(signal.SIGKILL)
