"""The TLS listener of `uns broker secure`'s local CA, on the real brokers: a client given
``ca.crt`` connects over ``mqtts://`` and logs in; one without it (the system store), one
reaching the broker by a name the certificate does not carry, and a wrong password are
refused. Mosquitto reads the generated ``tls.conf``, the embedded broker the generated
``services.broker`` (its certfile/keyfile) with a ``tls_port``; its plaintext listener
stays on the loopback. The files have owner-only modes and no key is printed."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from clitools import Proc, start, uns
from fixtures.brokers import AmqttBroker, started_mosquitto
from fixtures.ports import free_port
from uns import BrokerSettings, BusError, connect
from uns.config import load
from uns_broker import AclEntry
from uns_broker.secure import Written, write_policy
from uns_broker.tls import mosquitto_tls_conf

pytestmark = pytest.mark.integration

DEMO = "acme/pune/demo/line-0/cell-0/demo-01"
DEMO_ONLY = ("--config", str(Path(__file__).with_name("demo-only.yaml")))


@pytest.fixture
def written(tmp_path: Path) -> Written:
    return write_policy(load(), tmp_path / "secure", hosts=["localhost", "127.0.0.1"])


@asynccontextmanager
async def mosquitto(written: Written) -> AsyncIterator[int]:
    """Mosquitto with the generated users, ACL and TLS listener (on a free port)."""
    tls_port = free_port()
    broker = started_mosquitto(
        written.mosquitto_passwords.parent,
        extra=(
            "allow_anonymous false\n"
            f"password_file {written.mosquitto_passwords}\n"
            f"acl_file {written.mosquitto_acl}\n"
            + mosquitto_tls_conf(written.tls.ca_cert.parent, tls_port)
        ),
    )
    try:
        yield tls_port
    finally:
        broker.kill()


@asynccontextmanager
async def amqtt(written: Written) -> AsyncIterator[int]:
    """The embedded broker with the generated ``services.broker`` and a TLS port."""
    section = msgspec.yaml.decode(written.amqtt_settings.read_bytes())
    section["acl"] = {user: AclEntry(**entry) for user, entry in section["acl"].items()}
    tls_port = free_port()
    broker = AmqttBroker(free_port(), tls_port=tls_port, **section)
    assert broker.settings.host == "127.0.0.1"  # plaintext: the box's own clients only
    await broker.start()
    try:
        yield tls_port
    finally:
        await broker.stop()


BROKERS = [pytest.param(mosquitto, id="mosquitto"), pytest.param(amqtt, id="amqtt")]
Broker = Callable[[Written], AbstractAsyncContextManager[int]]


def app_password(written: Written) -> str:
    return written.secrets["app"].read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_client_with_the_ca_logs_in_over_tls_and_others_are_refused(
    written: Written, broker: Broker
) -> None:
    password = app_password(written)
    ca = str(written.tls.ca_cert)
    async with broker(written) as port:
        url = f"mqtts://app:{password}@127.0.0.1:{port}"
        async with connect(url, settings=BrokerSettings(url=url, ca_file=ca)) as bus:
            await bus.subscribe("acme/pune/#", qos=1)  # logged in as the read-only app

        with pytest.raises(BusError, match="certificate verify failed"):
            async with connect(url, settings=BrokerSettings(url=url), timeout_s=5):
                pass  # the system store does not know the box's CA

        other_name = f"mqtts://app:{password}@127.0.0.2:{port}"  # not in the certificate
        with pytest.raises(BusError, match="certificate verify failed"):
            async with connect(other_name, settings=BrokerSettings(url=url, ca_file=ca)):
                pass

        wrong = f"mqtts://app:not-the-password@127.0.0.1:{port}"
        with pytest.raises(BusError):
            async with connect(wrong, settings=BrokerSettings(url=url, ca_file=ca), timeout_s=5):
                pass


def test_the_ca_and_keys_are_owner_only_and_kept_on_a_second_run(tmp_path: Path) -> None:
    out = tmp_path / "secure"
    done = uns("broker", "secure", "--out", str(out), "--tls-host", "edge-01.plant.local")
    assert done.returncode == 0, done.stderr
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    tls = out / "tls"
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tls.iterdir()}
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    assert mode == {"ca.key": 0o600, "server.key": 0o600, "ca.crt": 0o600, "server.crt": 0o600}
    assert stat.S_IMODE((out / "mosquitto" / "tls.conf").stat().st_mode) == 0o600
    assert "edge-01.plant.local" in done.stdout
    conf = (out / "mosquitto" / "tls.conf").read_text()
    assert "listener 8883\n" in conf and "tls_version tlsv1.2\n" in conf

    ca = (tls / "ca.crt").read_bytes()
    again = uns("broker", "secure", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert (tls / "ca.crt").read_bytes() == ca  # clients that trust it go on trusting
    rotated = uns("broker", "secure", "--out", str(out), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert (tls / "ca.crt").read_bytes() != ca


def test_uns_up_secure_serves_tls_to_other_machines_and_plaintext_on_the_loopback_only(
    tmp_path: Path, procs: list[Proc]
) -> None:
    refused = uns("up", "--secure", "--host", "0.0.0.0", "--secrets", str(tmp_path / "x"))
    assert refused.returncode != 0 and "plaintext stays on the loopback" in refused.stderr

    port, tls_port, secrets = free_port(), free_port(), tmp_path / "secrets"
    up = start(
        procs,
        *("up", "--secure", "--secrets", str(secrets), "--metrics-port", "0"),
        *("--port", str(port), "--tls-port", str(tls_port), *DEMO_ONLY),
        ready="births published",
    )
    password = (secrets / "secrets" / "app.password").read_text().strip()
    env = {**os.environ, "UNS_BROKER__CA_FILE": str(secrets / "tls" / "ca.crt")}
    r = uns(
        "sub", f"{DEMO}/raw/data", "--count", "1", "--timeout", "10", "--json",
        "--broker", f"mqtts://app:{password}@localhost:{tls_port}", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert msgspec.json.decode(r.stdout.splitlines()[0])["payload"]["node"] == "demo"
    r = uns(
        "sub", "#", "--timeout", "1",
        "--broker", f"mqtts://app:{password}@localhost:{tls_port}",
    )  # fmt: skip
    assert r.returncode != 0, "no CA given: the system store must not trust the box's CA"
    assert "PRIVATE KEY" not in "\n".join(up.lines)
    assert up.stop() == 0
