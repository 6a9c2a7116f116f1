"""The policy `uns broker secure` writes for the example plant, on the real brokers: every
service's credential may use every topic its code uses, and is refused a representative
set it must not (other services' streams and node topics, commands, other sites, the
whole tree), publishing and subscribing; a retained message reaches no client outside its
ACL; anonymous and wrong-password clients are refused. Mosquitto reads the generated
``password_file``/``acl_file``, the embedded broker the generated ``services.broker``.

A ``witness`` user added by the test (reading and writing ``#``) sees what the broker let
through and sends what a credential must not receive.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from fixtures.brokers import AmqttBroker, started_mosquitto
from fixtures.ports import free_port
from uns import BusError, connect
from uns.config import load
from uns.scope import Scope, within
from uns.testing import Watcher, watching
from uns.topics import matches
from uns_broker import AclEntry
from uns_broker.secure import Written, mosquitto_hash, write_policy

WITNESS, WITNESS_PASSWORD = "witness", "witness-password"
DEVICE = "acme/pune/stamping/line-3/cell-a/press-01"

# Topics someone must not publish unless its scope says so (checked per user against it).
MUST_NOT_PUBLISH = [
    f"{DEVICE}/raw/data",
    f"{DEVICE}/raw/birth",
    f"{DEVICE}/features/data",
    f"{DEVICE}/scores/data",
    f"{DEVICE}/events/anomaly",
    f"{DEVICE}/events/sim_fault",
    f"{DEVICE}/cmd/fault",
    "acme/pune/_node/featurizer/birth",
    "acme/pune/_node/featurizer/death",
    "acme/pune/_node/inference/cmd",
    "acme/pune/_node/simulator/cmd",
    "other/site/stamping/line-3/cell-a/press-01/raw/data",
    "acme/pune/app/anything",
    # a node answers commands under its own id only: no service forges another's reply
    "uns-cli/featurizer/reply",
    "uns-cli/simulator/1234/reply",
    "uns-cli/reply",
]
MUST_NOT_SUBSCRIBE = ["#", "acme/#", "acme/pune/#", "+/+/_node/+/cmd", "$SYS/#", "uns-cli/#"]


def example(topic_filter: str) -> str:
    """A topic the filter matches (each wildcard filled with one level)."""
    return "/".join("x0" if level in ("+", "#") else level for level in topic_filter.split("/"))


def url(port: int, user: str, password: str) -> str:
    return f"mqtt://{user}:{password}@127.0.0.1:{port}"


def passwords(written: Written) -> dict[str, str]:
    return {u: f.read_text(encoding="utf-8").strip() for u, f in written.secrets.items()}


@pytest.fixture
def written(tmp_path: Path) -> Written:
    return write_policy(load(), tmp_path / "secure")


Broker = Callable[[Written], AbstractAsyncContextManager[int]]


@asynccontextmanager
async def mosquitto(written: Written) -> AsyncIterator[int]:
    """Mosquitto reading the generated files (plus the witness)."""
    with written.mosquitto_passwords.open("a") as f:
        f.write(f"{WITNESS}:{mosquitto_hash(WITNESS_PASSWORD)}\n")
    with written.mosquitto_acl.open("a") as f:
        f.write(f"\nuser {WITNESS}\ntopic readwrite #\n")
    broker = started_mosquitto(
        written.mosquitto_passwords.parent,
        extra=(
            "allow_anonymous false\n"
            f"password_file {written.mosquitto_passwords}\n"
            f"acl_file {written.mosquitto_acl}\n"
        ),
    )
    try:
        yield broker.port
    finally:
        broker.kill()


@asynccontextmanager
async def amqtt(written: Written) -> AsyncIterator[int]:
    """The embedded broker with the generated ``services.broker`` (plus the witness)."""
    section = msgspec.yaml.decode(written.amqtt_settings.read_bytes())
    with written.amqtt_passwords.open("a") as f:
        f.write(f"{WITNESS}:{PasswordHash((Argon2Hasher(),)).hash(WITNESS_PASSWORD)}\n")
    section["acl"][WITNESS] = {"publish": ["#"], "subscribe": ["#"]}
    section["acl"] = {user: AclEntry(**entry) for user, entry in section["acl"].items()}
    broker = AmqttBroker(free_port(), **section)
    await broker.start()
    try:
        yield broker.port
    finally:
        await broker.stop()


BROKERS = [pytest.param(mosquitto, id="mosquitto"), pytest.param(amqtt, id="amqtt")]


async def check_user(
    port: int, user: str, password: str, policy: dict[str, Scope], w: Watcher
) -> list[str]:
    """Check one credential; return the filters outside its ACL that the broker granted
    (Mosquitto 2.0 grants every subscription and filters what it delivers)."""
    scope = policy[user]
    others_publish = [example(f) for s in policy.values() for f in s.publish]
    others_subscribe = [f for s in policy.values() for f in s.subscribe]
    first, *rest = scope.subscribe
    granted: list[str] = []
    async with watching(url(port, user, password), first, client_id=f"t-{user}") as mine:
        for topic_filter in rest:
            await mine.bus.subscribe(topic_filter, qos=1)  # raises if refused
        outside = [
            f for f in [*MUST_NOT_SUBSCRIBE, *others_subscribe] if not scope.may_subscribe(f)
        ]
        for topic_filter in dict.fromkeys(outside):
            try:
                await mine.bus.subscribe(topic_filter, qos=1)
                granted.append(topic_filter)
            except BusError as exc:
                if "refused the subscription" not in str(exc):
                    raise

        # publishing: what it must not is dropped, what it must passes (the witness sees)
        tag = f"{user} {uuid.uuid4().hex}".encode()
        refused = [
            t
            for t in dict.fromkeys([*MUST_NOT_PUBLISH, *others_publish])
            if not scope.may_publish(t)
        ]
        allowed = [example(f) for f in scope.publish]
        for topic in [*refused, *allowed]:
            await mine.bus.publish(topic, tag, qos=1)
        marker = f"uns-test/{uuid.uuid4().hex}"
        await w.bus.publish(marker, b"marker", qos=1)  # the witness's own: after the user's
        await w.wait_for(lambda m: m.topic == marker)
        passed = {m.topic for m in w.messages if m.payload == tag}
        assert passed == set(allowed), (user, sorted(passed ^ set(allowed)))
        assert refused and (user == "app" or allowed)

        # receiving: of what the witness publishes, only what its ACL reads arrives
        probe = f"probe {uuid.uuid4().hex}".encode()
        readable = [example(f) for f in scope.subscribe]
        probes = [
            t
            for t in dict.fromkeys([*map(example, outside), *MUST_NOT_PUBLISH, *readable])
            if not t.startswith("$")  # the broker's own: no client publishes there
        ]
        for topic in probes:
            await w.bus.publish(topic, probe, qos=1)
        expected = {t for t in probes if any(matches(f, t) for f in scope.subscribe)}
        await mine.wait(lambda: {m.topic for m in mine.messages if m.payload == probe} >= expected)
        await w.bus.publish(readable[0], b"last", qos=1)  # after every probe
        await mine.wait_for(lambda m: m.payload == b"last")
        got = {m.topic for m in mine.messages if m.payload == probe}
        assert got == expected, (user, sorted(got ^ expected))
        assert got != set(probes), user
    return granted


@pytest.mark.parametrize("broker", BROKERS)
async def test_every_credential_may_do_what_its_service_does_and_nothing_else(
    broker: Broker, written: Written
) -> None:
    secret = passwords(written)
    async with broker(written) as port, watching(url(port, WITNESS, WITNESS_PASSWORD), "#") as w:
        granted = {
            user: await check_user(port, user, secret[user], written.policy, w)
            for user in written.policy
        }
    # amqtt refuses a subscription outside the ACL; Mosquitto 2.0 grants it (MQTT 3.1.1)
    # and delivers nothing outside the ACL, which check_user saw
    if broker is amqtt:
        assert not any(granted.values()), granted


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_retained_message_reaches_no_client_outside_its_acl(
    broker: Broker, written: Written
) -> None:
    secret = passwords(written)
    retained = {
        "featurizer": "acme/pune/_node/featurizer/birth",
        "opcua-adapter": f"{DEVICE}/raw/birth",
        "inference": f"{DEVICE}/events/anomaly",
        "simulator": f"{DEVICE}/events/sim_fault",
    }
    async with broker(written) as port:
        for user, topic in retained.items():
            async with connect(url(port, user, secret[user])) as bus:
                await bus.publish(topic, b"retained", qos=1, retain=True)
        async with watching(url(port, WITNESS, WITNESS_PASSWORD), "#") as w:
            await w.wait(lambda: {m.topic for m in w.messages} >= set(retained.values()))
        async with connect(url(port, "operator", secret["operator"])) as operator:
            for user, scope in written.policy.items():
                first, *rest = scope.subscribe
                async with watching(url(port, user, secret[user]), first) as seen:
                    for topic_filter in [*rest, *MUST_NOT_SUBSCRIBE]:
                        try:
                            await seen.bus.subscribe(topic_filter, qos=1)
                        except BusError:
                            assert not scope.may_subscribe(topic_filter)
                    # after every retained message sent to it: a live one on its own cmd
                    node = "marker" if user in ("operator", "app") else user
                    marker = f"acme/pune/_node/{node}/cmd"
                    await operator.publish(marker, b"marker", qos=1)
                    await seen.wait_for(lambda m, marker=marker: m.topic == marker)
                    got = {m.topic for m in seen.messages if m.retain}
                expected = {
                    t for t in retained.values() if any(within(t, f) for f in scope.subscribe)
                }
                assert got == expected, (user, sorted(got ^ expected))


@pytest.mark.parametrize("broker", BROKERS)
async def test_anonymous_and_wrong_password_clients_are_refused(
    broker: Broker, written: Written
) -> None:
    secret = passwords(written)
    async with broker(written) as port:
        for who in (
            f"mqtt://127.0.0.1:{port}",
            url(port, "featurizer", "not-its-password"),
            url(port, "featurizer", secret["inference"]),
            url(port, "nobody", secret["featurizer"]),
        ):
            with pytest.raises(BusError):
                async with connect(who, timeout_s=5):
                    pass
        async with connect(url(port, "featurizer", secret["featurizer"])):
            pass  # its own password is accepted


@pytest.mark.parametrize("broker", BROKERS)
async def test_with_sparkplug_on_a_scada_user_reads_the_edge_node_and_sends_only_its_commands(
    broker: Broker, tmp_path: Path
) -> None:
    """The Sparkplug edge node enabled on the namespace's broker: the policy gains
    ``scada`` (Ignition's MQTT Engine), which reads the edge node's group, sends its NCMD
    and DCMD and its own STATE, and nothing of the namespace; the edge node's own user
    publishes its Sparkplug messages."""
    written = write_policy(
        load(environ={"UNS_SERVICES__SPARKPLUG__ENABLED": "true"}), tmp_path / "secure"
    )
    assert set(written.policy) >= {"scada", "sparkplug"}
    assert not any(written.policy["scada"].may_publish(t) for t in MUST_NOT_PUBLISH)
    assert written.policy["scada"].may_publish("spBv1.0/acme/NCMD/pune")
    assert not written.policy["scada"].may_publish("spBv1.0/acme/NDATA/pune")
    secret = passwords(written)
    async with broker(written) as port, watching(url(port, WITNESS, WITNESS_PASSWORD), "#") as w:
        for user in ("scada", "sparkplug"):
            await check_user(port, user, secret[user], written.policy, w)
