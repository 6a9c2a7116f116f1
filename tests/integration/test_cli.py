"""The foundation as a user meets it: real processes, a real broker, the `uns` command."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from clitools import Proc, start, sub_json, uns
from fixtures.ports import free_port

pytestmark = pytest.mark.integration

DEMO = "acme/pune/demo/line-0/cell-0/demo-01"
# `uns up` of the foundation's tests: the broker and the demo device only
DEMO_ONLY_CONFIG = Path(__file__).with_name("demo-only.yaml")
DEMO_ONLY = ("--config", str(DEMO_ONLY_CONFIG))


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


@pytest.fixture
def embedded(procs: list[Proc]) -> tuple[str, int]:
    port = free_port()
    start(procs, "broker", "--port", str(port), ready="broker listening")
    return f"mqtt://127.0.0.1:{port}", port


def test_sub_shows_the_typed_births_and_data_of_a_service(embedded, procs):
    url, _ = embedded
    start(procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published")
    lines = sub_json(url, "#", count=4)
    types = [(line["topic"], line["payload"]["type"]) for line in lines]
    assert types[:2] == [("acme/pune/_node/demo/birth", "nbirth"), (f"{DEMO}/raw/birth", "dbirth")]
    assert all(t == (f"{DEMO}/raw/data", "ddata") for t in types[2:])
    assert lines[0]["retained"] is True and lines[2]["retained"] is False
    birth = lines[1]["payload"]
    assert {m["name"]: m.get("unit") for m in birth["metrics"]}["temperature"] == "degC"


def test_tree_shows_nodes_devices_and_metrics_with_units(embedded, procs):
    url, _ = embedded
    start(procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published")
    r = uns("tree", "--broker", url)
    assert r.returncode == 0, r.stderr
    for text in (
        "acme",
        "_node",
        "demo 0.1.0",
        "online",
        "demo-01",
        "raw",
        "temperature",
        "[degC]",
    ):
        assert text in r.stdout


def test_a_killed_broker_comes_back_and_every_birth_reappears_within_5_seconds(embedded, procs):
    url, port = embedded
    demo = start(
        procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published"
    )
    procs[0].stop(signal.SIGKILL)
    demo.wait_line("retrying")
    start(procs, "broker", "--port", str(port), ready="broker listening")
    lines = sub_json(url, "+/+/+/+/+/+/+/birth", count=1, timeout=5)
    assert lines[0]["payload"]["type"] == "dbirth"
    lines = sub_json(url, "+/+/_node/+/birth", count=1, timeout=5)
    assert lines[0]["payload"]["node"] == "demo"
    assert demo.p.poll() is None, "the service must not crash"
    assert "Traceback" not in "".join(demo.lines)


def test_garbage_on_a_service_input_is_dropped_counted_and_the_service_keeps_working(
    embedded, procs
):
    url, _ = embedded
    start(procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published")
    birth = sub_json(url, "acme/pune/_node/demo/birth", count=1)[0]["payload"]
    metrics_url = birth["metrics_url"]
    assert metric(metrics_url, "uns_messages_dropped_total", reason="decode") == 0
    r = uns("pub", f"{DEMO}/cmd/set", "this is not json", "--no-check", "--broker", url)
    assert r.returncode == 0, r.stderr
    r = uns(
        "pub",
        f"{DEMO}/cmd/set",
        '{"type":"cmd","ts":1,"name":"set","args":{"running":false}}',
        "--broker",
        url,
    )
    assert r.returncode == 0, r.stderr
    # the valid command after the garbage is still obeyed
    lines = sub_json(url, f"{DEMO}/raw/data", count=3)
    assert any(
        m["value"] is False
        for line in lines
        for m in line["payload"]["metrics"]
        if m["name"] == "running"
    )
    assert metric(metrics_url, "uns_messages_dropped_total", reason="decode") == 1
    assert metric(metrics_url, "uns_messages_received_total", stream="cmd") == 2


def test_the_standard_metrics_are_served(embedded, procs):
    url, _ = embedded
    start(procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published")
    metrics_url = sub_json(url, "acme/pune/_node/demo/birth", count=1)[0]["payload"]["metrics_url"]
    assert metric(metrics_url, "uns_connected", service="demo") == 1
    assert metric(metrics_url, "uns_messages_published_total", stream="raw") >= 1
    assert metric(metrics_url, "uns_reconnects_total", service="demo") == 0
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for name in (
        "uns_messages_received_total",
        "uns_messages_dropped_total",
        "uns_handler_duration_seconds_bucket",
        "uns_queue_depth_messages",
    ):
        assert name in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_a_service_with_exit_0_and_a_retained_death(embedded, procs, sig):
    url, _ = embedded
    demo = start(
        procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="births published"
    )
    assert demo.stop(sig) == 0
    death = sub_json(url, "acme/pune/_node/demo/death", count=1)[0]
    assert death["retained"] and death["payload"]["reason"] == "shutdown"


def test_an_unreachable_broker_gets_a_retry_message_not_a_traceback():
    url = f"mqtt://127.0.0.1:{free_port()}"
    r = uns("sub", "#", "--timeout", "2", "--broker", url)
    assert r.returncode == 1
    assert "unreachable" in r.stderr and "retrying" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_service_waits_for_a_broker_that_is_not_there_yet(procs):
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    demo = start(procs, "run", "demo", "--broker", url, "--metrics-port", "0", ready="retrying")
    start(procs, "broker", "--port", str(port), ready="broker listening")
    demo.wait_line("births published")
    assert "Traceback" not in "".join(demo.lines)


def test_an_invalid_filter_or_broker_url_is_a_clear_error():
    r = uns("sub", "a/#/b")
    assert r.returncode == 2 and "'#' must be the last level" in r.stderr
    r = uns("sub", "#", "--broker", "http://x")
    assert r.returncode == 2 and "--broker" in r.stderr


def test_pub_refuses_a_payload_that_breaks_the_contract():
    r = uns("pub", "a/b", '{"type":"cmd","ts":"now","name":"x"}', "--broker", "mqtt://127.0.0.1:1")
    assert r.returncode == 2 and "$.ts" in r.stderr


def test_uns_up_runs_the_broker_and_the_services_and_stops_them_all(procs):
    port = free_port()
    up = start(
        procs,
        "up",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *DEMO_ONLY,
        ready="births published",
    )
    url = f"mqtt://127.0.0.1:{port}"
    lines = sub_json(url, "acme/pune/_node/+/birth", count=1)
    assert lines[0]["payload"]["service"] == "demo"
    assert up.stop(signal.SIGTERM) == 0
    r = uns("sub", "#", "--timeout", "1", "--broker", url)
    assert r.returncode == 1, "the broker must be gone"


def test_two_uns_up_run_side_by_side_on_their_own_ports(procs):
    ports = [free_port(), free_port()]
    ups = [
        start(
            procs,
            "up",
            "--port",
            str(p),
            "--metrics-port",
            "0",
            *DEMO_ONLY,
            ready="births published",
        )
        for p in ports
    ]
    for p in ports:
        lines = sub_json(f"mqtt://127.0.0.1:{p}", "acme/pune/_node/demo/birth", count=1)
        assert lines[0]["payload"]["service"] == "demo"
    assert [up.stop() for up in ups] == [0, 0]


def test_uns_up_with_an_external_broker_starts_no_broker(mosquitto, procs):
    up = start(
        procs,
        "up",
        "--broker",
        mosquitto.url,
        "--metrics-port",
        "0",
        *DEMO_ONLY,
        ready="births published",
    )
    lines = sub_json(mosquitto.url, "acme/pune/_node/demo/birth", count=1)
    assert lines[0]["payload"]["type"] == "nbirth"
    assert not any("broker listening" in line for line in up.lines)
    assert up.stop() == 0


def test_uns_up_restarts_a_crashed_service(procs):
    port = free_port()
    up = start(
        procs,
        "up",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *DEMO_ONLY,
        ready="births published",
    )
    pid_line = next(line for line in up.lines if "started demo" in line)
    pid = int(pid_line.rsplit("pid ", 1)[1].rstrip(")\n"))
    os.kill(pid, signal.SIGKILL)
    up.wait_line("restarting")
    up.wait_line("births published")
    death = sub_json(f"mqtt://127.0.0.1:{port}", "acme/pune/_node/demo/birth", count=1)
    assert death[0]["payload"]["bdseq"] == 0  # a new process, a new birth
    assert up.stop() == 0


def test_the_embedded_broker_enforces_users_and_acls(tmp_path, procs):
    pwfile = tmp_path / "passwd"
    for user, pw in (("featurizer", "f-secret"), ("viewer", "v-secret")):
        r = uns("broker", "passwd", str(pwfile), user, input=pw + "\n")
        assert r.returncode == 0, r.stderr
    config = tmp_path / "plant.yaml"
    config.write_text(
        f"services:\n  broker:\n    password_file: {pwfile}\n    acl:\n"
        "      featurizer: {publish: ['acme/+/+/+/+/+/features/#'], subscribe: ['#']}\n"
        "      viewer: {publish: [], subscribe: ['acme/#']}\n"
    )
    port = free_port()
    start(procs, "broker", "--port", str(port), "--config", str(config), ready="users required")

    def url(user: str, pw: str) -> str:
        return f"mqtt://{user}:{pw}@127.0.0.1:{port}"

    r = uns("sub", "#", "--timeout", "1", "--broker", f"mqtt://127.0.0.1:{port}")
    assert r.returncode == 1, "anonymous clients are refused"
    r = uns("sub", "#", "--timeout", "1", "--broker", url("viewer", "wrong"))
    assert r.returncode == 1, "a wrong password is refused"
    viewer = Proc(
        "sub",
        "acme/#",
        "--json",
        "--count",
        "1",
        "--timeout",
        "10",
        "--broker",
        url("viewer", "v-secret"),
    )
    procs.append(viewer)
    topic = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
    body = '{"type":"ddata","ts":1,"node":"f","seq":0,"metrics":[]}'
    # the featurizer may not publish raw data; it may publish features
    for t in (topic.replace("features", "raw"), topic):
        r = uns("pub", t, body, "--broker", url("featurizer", "f-secret"))
        assert r.returncode == 0, r.stderr
    assert viewer.p.wait(timeout=20) == 0
    out = viewer.p.stdout.read() if viewer.p.stdout else ""
    assert [json.loads(line)["topic"] for line in out.splitlines()] == [topic]


def test_schema_check_passes_on_the_checked_in_schema(tmp_path):
    assert uns("schema", "check").returncode == 0
    r = uns("schema", "check", "--dir", str(tmp_path))
    assert r.returncode == 1 and "stale" in r.stderr


def test_demo_interop_with_mosquitto(mosquitto, procs):
    start(
        procs,
        "run",
        "demo",
        "--broker",
        mosquitto.url,
        "--metrics-port",
        "0",
        ready="births published",
    )
    lines = sub_json(mosquitto.url, "acme/#", count=3)
    assert [line["payload"]["type"] for line in lines][:2] == ["nbirth", "dbirth"] or {
        line["payload"]["type"] for line in lines
    } >= {"nbirth", "dbirth"}


def test_the_example_plant_config_is_valid_for_every_installed_service():
    from uns import load
    from uns.plugins import service_classes

    loaded = load(Path(__file__).parents[2] / "uns-schema" / "plant.yaml", environ={})
    for name, ep in service_classes().items():
        loaded.service(name, ep.load().Settings)


def test_mqtts_verifies_the_broker_certificate_and_hostname(tmp_path, procs):
    from fixtures.brokers import Mosquitto, mosquitto_binary
    from fixtures.pki import CertAuthority

    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    pki = CertAuthority(tmp_path)
    cert, key = pki.issue("broker", server=True)
    broker = Mosquitto(tmp_path, extra=f"cafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n")
    broker.start()
    try:
        url = f"mqtts://localhost:{broker.port}"
        trusted = {**os.environ, "UNS_BROKER__CA_FILE": str(pki.ca)}
        start(
            procs,
            "run",
            "demo",
            "--broker",
            url,
            "--metrics-port",
            "0",
            ready="births published",
            env={"UNS_BROKER__CA_FILE": str(pki.ca)},
        )
        r = uns(
            "sub",
            "acme/#",
            "--json",
            "--count",
            "2",
            "--timeout",
            "10",
            "--broker",
            url,
            env=trusted,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[0])["payload"]["type"] == "nbirth"
        # without the plant's CA the broker is not trusted: a clear error, no traceback
        r = uns("sub", "#", "--timeout", "2", "--broker", url)
        assert r.returncode == 1
        assert "certificate verify failed" in r.stderr and "Traceback" not in r.stderr
    finally:
        broker.kill()


def test_uns_up_runs_the_bridge_towards_a_second_local_broker_as_the_cloud(procs, tmp_path):
    config = tmp_path / "plant.yaml"
    config.write_text(
        DEMO_ONLY_CONFIG.read_text().replace(
            "bridge: {enabled: false}", f"bridge: {{journal: {{path: {tmp_path}/journal.sqlite}}}}"
        )
    )
    port, cloud = free_port(), free_port()
    up = start(
        procs,
        "up",
        "--port",
        str(port),
        "--cloud-port",
        str(cloud),
        "--metrics-port",
        "0",
        "--config",
        str(config),
        ready="births published",
    )
    lines = sub_json(f"mqtt://127.0.0.1:{cloud}", "acme/pune/_node/demo/birth", count=1, timeout=20)
    assert lines[0]["payload"]["type"] == "nbirth"  # relayed by the bridge
    assert up.stop() == 0


def test_uns_up_starts_no_process_that_would_only_idle_and_says_why():
    """The example plant has no cloud: its bridge would idle (40-45 MB of a box for
    nothing), so `uns up` does not start it and its plan says why; given a cloud, it does."""
    plan = uns("up", "--plan")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"^bridge +not started: no remote configured", plan.stdout, re.M)
    assert re.search(r"^featurizer +metrics port", plan.stdout, re.M)
    cloud = uns("up", "--plan", "--cloud-port", str(free_port()))
    assert re.search(r"^bridge +metrics port", cloud.stdout, re.M), cloud.stdout
