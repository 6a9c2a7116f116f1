"""``broker.urls``: the other nodes of a clustered broker, tried in turn when the one in
use drops (issue 14). On the in-memory bus (fast); on a real RabbitMQ cluster in
tests/integration/test_cluster_rabbitmq.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from uns import ConfigError, DeviceBirth, DeviceData, Node, NodeBirth, load
from uns.config import BrokerSettings, Namespace, UnsConfig
from uns.membus import MemoryBroker
from uns.testing import memory_url, watching
from uns_demo import DemoService, DemoSettings


def write(tmp_path, text):
    f = tmp_path / "plant.yaml"
    f.write_text(text)
    return f


def test_old_configs_have_no_fallbacks_and_the_url_comes_first():
    assert BrokerSettings().candidates() == ["mqtt://127.0.0.1:1883"]
    b = BrokerSettings(
        url="mqtt://a:1", urls=["mqtt://b:2", "mqtt://a:1", "mqtt://c:3", "mqtt://b:2"]
    )
    assert b.candidates() == ["mqtt://a:1", "mqtt://b:2", "mqtt://c:3"]
    # --broker (what `uns up` hands its children) replaces the url, not the fallbacks
    assert b.candidates("mqtt://c:3") == ["mqtt://c:3", "mqtt://b:2", "mqtt://a:1"]


def test_fallbacks_come_from_the_file_or_a_variable(tmp_path):
    f = write(tmp_path, "broker:\n  url: mqtt://rmq-1:1883\n  urls: [mqtt://rmq-2:1883]\n")
    assert load(f, environ={}).config.broker.candidates() == [
        "mqtt://rmq-1:1883",
        "mqtt://rmq-2:1883",
    ]
    env = {"UNS_BROKER__URLS": "[mqtt://rmq-3:1883]"}
    assert load(f, environ=env).config.broker.urls == ["mqtt://rmq-3:1883"]


@pytest.mark.parametrize(
    ("urls", "why"),
    [
        ("[mqtt://ok:1883, http://broker:1883]", r"broker.urls\[1\]: .*not a broker URL"),
        ("[mqtt://:1883]", r"broker.urls\[0\]: .*no host"),
        ("mqtt://a:1883,mqtt://b:1883", r"broker.urls: Expected `array`, got `str`"),
    ],
)
def test_a_bad_fallback_is_refused_by_name(tmp_path, urls, why):
    f = write(tmp_path, f"broker:\n  urls: {urls}\n")
    with pytest.raises(ConfigError, match=why):
        load(f, environ={})


def test_a_bad_fallback_exits_with_code_2_naming_it(tmp_path):
    f = write(tmp_path, "broker:\n  urls: [mqtt://host:99999]\n")
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "demo", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "broker.urls[0]" in result.stderr and "invalid port" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_node_whose_broker_dies_goes_on_on_the_next_one_and_stays_there():
    first, second = memory_url(), memory_url()
    config = UnsConfig(
        namespace=Namespace(enterprise="acme", site="pune"),
        broker=BrokerSettings(url=first, urls=[second]),
    )
    settings = DemoSettings(interval_s=0.02, metrics_port=0, reconnect_min_s=0.05)
    node = Node("demo", settings, config, version="test")
    stop = asyncio.Event()
    task = asyncio.create_task(node.serve(DemoService(node), stop))
    try:
        async with watching(first, "acme/#") as on_first:
            birth = await on_first.next("acme/pune/_node/demo/birth", NodeBirth)
            await on_first.next("+/+/+/+/+/+/raw/data", DeviceData)
        async with watching(second, "acme/#") as on_second:
            MemoryBroker.named(first.removeprefix("memory://")).stop()
            again = await on_second.next("acme/pune/_node/demo/birth", NodeBirth)
            assert again.bdseq != birth.bdseq  # a new session: consumers see the change
            await on_second.next("+/+/+/+/+/+/raw/birth", DeviceBirth)
            data = await on_second.next("+/+/+/+/+/+/raw/data", DeviceData)
            assert data.seq >= 1  # numbered after the births of the new session
            MemoryBroker.named(first.removeprefix("memory://")).start()
            await on_second.next("+/+/+/+/+/+/raw/data", DeviceData)
        assert MemoryBroker.named(second.removeprefix("memory://")).client_ids() == [
            "demo.1"
        ]  # its own id there (see Node)
        assert MemoryBroker.named(first.removeprefix("memory://")).client_ids() == []
    finally:
        stop.set()
        await task
        for url in (first, second):
            MemoryBroker._registry.pop(url.removeprefix("memory://"), None)


async def test_the_sparkplug_edge_node_goes_on_on_the_next_broker_too():
    """Its own connection (its Last Will is the NDEATH): it fails over as the runtime does,
    rather than redialling a dead node of the cluster forever (issue 14's leftover)."""
    from uns_sparkplug.north import SparkplugNode
    from uns_sparkplug.settings import SparkplugSettings

    first, second = memory_url(), memory_url()
    config = UnsConfig(
        namespace=Namespace(enterprise="acme", site="pune"),
        broker=BrokerSettings(url=first, urls=[second]),
    )
    settings = SparkplugSettings(
        enabled=True, metrics_port=0, reconnect_min_s=0.05, reconnect_max_s=0.2
    )
    node = Node("sparkplug", settings, config, version="test")
    stop = asyncio.Event()
    task = asyncio.create_task(node.serve(SparkplugNode(node), stop))
    nbirth = "spBv1.0/acme/NBIRTH/pune"
    try:
        async with watching(first, "spBv1.0/#") as on_first:
            await on_first.wait_for(lambda m: m.topic == nbirth)  # protobuf, not JSON
        async with watching(second, "spBv1.0/#") as on_second:
            MemoryBroker.named(first.removeprefix("memory://")).stop()
            await on_second.wait_for(lambda m: m.topic == nbirth)
    finally:
        stop.set()
        await task
        for url in (first, second):
            MemoryBroker._registry.pop(url.removeprefix("memory://"), None)
