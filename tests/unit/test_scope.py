"""A service's declared scope is enforced by its own runtime: a message to a topic outside
it is refused and counted (reason="out_of_scope"), a device outside it is never born, a
subscription outside it stops the service at start; every shipped service declares one
that fits the example plant."""

from __future__ import annotations

import itertools
import logging
import random

import pytest

from uns import Command, DeviceData, DevicePath, Metric, MetricDef, Node, Service, TopicError
from uns.config import UnsConfig, load
from uns.plugins import services
from uns.runtime import ServiceSettings
from uns.scope import Scope, within
from uns.testing import memory_broker, running, watching
from uns.topics import matches

OWN = "test/pune/area/line-0/cell-0/own-01"
OTHER = "test/pune/area/line-0/cell-0/other-01"


class FencedSettings(ServiceSettings, frozen=True):
    extra_filter: str | None = None

    def scope(self, config: UnsConfig) -> Scope:
        return Scope(publish=(f"{OWN}/raw/+",), subscribe=(f"{OWN}/cmd/+",))


class Fenced(Service[FencedSettings]):
    """Does, on command, what a buggy service would: publish as another device."""

    name = "fenced"
    Settings = FencedSettings

    def __init__(self, node: Node[FencedSettings]) -> None:
        super().__init__(node)
        node.subscribe(f"{OWN}/cmd/go", Command, self.on_go)
        if self.settings.extra_filter:
            node.subscribe(self.settings.extra_filter, Command, self.on_go)

    async def on_go(self, msg: object) -> None:
        for path in (OTHER, OWN):
            device = DevicePath.parse(path)
            await self.node.device_birth(device, "raw", [MetricDef(name="x", datatype="int32")])
            await self.node.device_data(device, "raw", [Metric(name="x", value=1)])


async def test_a_message_outside_the_declared_scope_is_refused_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        memory_broker() as url,
        watching(url, "test/#") as w,
        running(Fenced, url) as node,
    ):
        with caplog.at_level(logging.WARNING, logger="uns.runtime"):
            await w.publish(f"{OWN}/cmd/go", Command(ts=1, name="go"))
            await w.next(f"{OWN}/raw/data", DeviceData)
        topics = {m.topic for m in w.messages}
        assert node.metrics.dropped_count("out_of_scope") == 2  # the birth and the data
    assert not any(t.startswith(OTHER) for t in topics), topics
    assert {f"{OWN}/raw/birth", f"{OWN}/raw/data", "test/pune/_node/fenced/birth"} <= topics
    refused = [r for r in caplog.records if "out_of_scope" in r.getMessage()]
    assert len(refused) == 1 and OTHER in refused[0].getMessage()  # throttled: one line


async def test_a_subscription_outside_the_declared_scope_stops_the_service_at_start() -> None:
    async with memory_broker() as url:
        with pytest.raises(TopicError, match=r"fenced: subscribes to 'test/#', outside"):
            async with running(Fenced, url, extra_filter="test/#"):
                pass


def test_within_agrees_with_mqtt_matching() -> None:
    """``within(a, b)``: every topic ``a`` matches, ``b`` matches (checked on every topic
    of a small alphabet) and, where it says no, a topic shows it."""
    levels = ["a", "b", "+"]
    filters = (
        {"/".join(p) for n in (1, 2, 3) for p in itertools.product(levels, repeat=n)}
        | {f + "/#" for f in ("a", "+", "a/b", "+/+")}
        | {"#"}
    )
    topics = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(["a", "b"], repeat=n)]
    rng = random.Random(1)
    for inner, outer in rng.sample(sorted(itertools.product(filters, filters)), 1500):
        seen = [t for t in topics if matches(inner, t)]
        agrees = all(matches(outer, t) for t in seen)
        assert within(inner, outer) == agrees, (inner, outer)


def test_every_shipped_service_declares_a_scope_for_the_example_plant() -> None:
    loaded = load()
    declared = {}
    for name, plugin in services().items():
        if name in ("broker", "replay"):
            continue  # not a node / given its device on the command line
        settings = loaded.service(name, plugin.load_settings())
        declared[name] = settings.scope(loaded.config)
    assert all(isinstance(s, Scope) for s in declared.values()), declared
    assert declared["featurizer"].may_publish("acme/pune/a/l/c/d/features/data")
    assert not declared["featurizer"].may_publish("acme/pune/a/l/c/d/raw/data")
    assert not declared["featurizer"].may_publish("acme/pune/a/l/c/d/cmd/fault")
    assert declared["inference"].may_publish("acme/pune/_node/featurizer/cmd")
    assert not declared["opcua-adapter"].may_publish("acme/pune/_node/featurizer/cmd")


def test_the_site_policy_gives_each_node_its_scope_the_operator_commands_the_app_reads(
    tmp_path,
) -> None:
    from uns.policy import site_policy

    config = tmp_path / "plant.yaml"
    config.write_text(
        "namespace: {enterprise: acme, site: pune}\n"
        "services:\n  featurizer: {node_id: featurizer-2}\n"
    )
    policy = site_policy(load(config))
    assert "broker" not in policy and "featurizer" not in policy
    feat = policy["featurizer-2"]
    assert feat.may_publish("acme/pune/_node/featurizer-2/birth")
    assert not feat.may_publish("acme/pune/_node/featurizer/birth")
    assert feat.may_subscribe("acme/pune/_node/featurizer-2/cmd")
    commanders = {u for u, s in policy.items() if s.may_publish("acme/pune/a/l/c/d/cmd/fault")}
    assert commanders == {"operator"}
    assert {u for u, s in policy.items() if s.may_publish("acme/pune/_node/demo/cmd")} == {
        "operator",
        "inference",  # its rebirth requests
    }
    assert policy["app"].publish == ()
    assert policy["app"].may_subscribe("+/+/+/+/+/+/+/birth")  # uns top's filters
    assert not policy["app"].may_subscribe("#")

    config.write_text("services:\n  featurizer: {node_id: operator}\n")
    with pytest.raises(ValueError, match="'operator', a name the policy keeps"):
        site_policy(load(config))


def test_the_policy_is_made_without_importing_a_service_or_its_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from uns.config import load\n"
        "from uns.policy import site_policy\n"
        "site_policy(load())\n"
        "heavy = ('asyncua', 'pymodbus', 'numpy', 'onnxruntime', 'amqtt')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m.endswith('.service')])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
