"""`uns up --secure`: the embedded broker with the generated users and ACLs, every service
logged in as itself (its credential in its environment, never on a command line or in a
log), anonymous clients refused, and a CLI client logging in through the environment."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clitools import Proc, start, sub_json, uns
from fixtures.ports import free_port

pytestmark = pytest.mark.integration

DEMO = "acme/pune/demo/line-0/cell-0/demo-01"
DEMO_ONLY = ("--config", str(Path(__file__).with_name("demo-only.yaml")))


def test_uns_up_secure_runs_each_service_as_itself_and_refuses_anonymous_clients(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, secrets = free_port(), tmp_path / "secrets"
    up = start(
        procs,
        "up",
        "--secure",
        "--secrets",
        str(secrets),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *DEMO_ONLY,
        ready="births published",
    )
    password = {f.stem: f.read_text().strip() for f in (secrets / "secrets").glob("*.password")}
    assert {"demo", "operator", "app"} <= set(password)

    # the demo published as itself: the read-only app sees its data
    app = f"mqtt://app:{password['app']}@127.0.0.1:{port}"
    [data] = sub_json(app, f"{DEMO}/raw/data", count=1)
    assert data["payload"]["node"] == "demo"
    # anonymous and wrong passwords are refused
    for url in (f"mqtt://127.0.0.1:{port}", f"mqtt://app:{password['demo']}@127.0.0.1:{port}"):
        r = uns("sub", "#", "--timeout", "1", "--broker", url)
        assert r.returncode == 1, (url, r.stderr)
    # a CLI client logs in through the environment, like a service
    env = {
        **os.environ,
        "UNS_BROKER__USERNAME": "operator",
        "UNS_BROKER__PASSWORD_FILE": str(secrets / "secrets" / "operator.password"),
    }
    r = uns(
        "sub", "acme/pune/_node/demo/birth", "--count", "1", "--timeout", "10",
        "--broker", f"mqtt://127.0.0.1:{port}", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

    log = "\n".join(up.lines)
    assert not [user for user, pw in password.items() if pw in log], "a password was logged"
    assert "not accepting connections yet" not in log  # the readiness probe logs in
    for f in (secrets / "secrets").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert up.stop() == 0


def test_uns_up_secure_with_mosquitto_logs_each_service_in_with_the_same_policy(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """An edge box with Mosquitto installed: it reads the generated files, and
    ``uns up --secure --broker`` starts the services with the credentials in them."""
    from fixtures.brokers import started_mosquitto
    from uns.config import load
    from uns_broker.secure import write_policy

    secrets = tmp_path / "secrets"
    written = write_policy(load(DEMO_ONLY[1]), secrets)
    broker = started_mosquitto(
        tmp_path,
        extra=(
            "allow_anonymous false\n"
            f"password_file {written.mosquitto_passwords}\n"
            f"acl_file {written.mosquitto_acl}\n"
        ),
    )
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        start(
            procs,
            "up",
            "--secure",
            "--secrets",
            str(secrets),
            "--broker",
            url,
            "--metrics-port",
            "0",
            *DEMO_ONLY,
            ready="births published",
        )
        app = written.secrets["app"].read_text().strip()
        [data] = sub_json(f"mqtt://app:{app}@127.0.0.1:{broker.port}", f"{DEMO}/raw/data", 1)
        assert data["payload"]["node"] == "demo"
        r = uns("sub", "#", "--timeout", "1", "--broker", url)
        assert r.returncode == 1, "anonymous clients are refused"
    finally:
        for p in procs:
            p.stop()
        broker.kill()


def test_broker_secure_writes_private_files_never_prints_a_password_and_keeps_them(
    tmp_path: Path,
) -> None:
    out = tmp_path / "policy"
    first = uns("broker", "secure", "--out", str(out), *DEMO_ONLY)
    assert first.returncode == 0, first.stderr
    password = {f.stem: f.read_text().strip() for f in (out / "secrets").glob("*.password")}
    assert {"demo", "featurizer", "inference", "operator", "app"} <= set(password)
    assert "broker" not in password  # the broker is no client of itself
    assert len(set(password.values())) == len(password)  # one each
    printed = first.stdout + first.stderr
    assert not [u for u, pw in password.items() if pw in printed], "a password was printed"
    for f in [*out.rglob("*")]:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o700 if f.is_dir() else 0o600), (f, oct(mode))
    lines = (out / "mosquitto" / "password_file").read_text().splitlines()
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)

    again = uns("broker", "secure", "--out", str(out), *DEMO_ONLY)
    assert again.returncode == 0, again.stderr
    kept = {f.stem: f.read_text().strip() for f in (out / "secrets").glob("*.password")}
    assert kept == password  # a second run changes the ACLs, not the credentials
    rotated = uns("broker", "secure", "--out", str(out), "--rotate", *DEMO_ONLY)
    assert rotated.returncode == 0, rotated.stderr
    new = {f.stem: f.read_text().strip() for f in (out / "secrets").glob("*.password")}
    assert new.keys() == password.keys()
    assert not set(new.values()) & set(password.values())
