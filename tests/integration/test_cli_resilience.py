"""The `uns` command under faults, as a user runs it: real processes, a real broker that is
killed and restarted, signals, and config an integrator gets subtly wrong."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clitools import Proc, start, sub_json, uns
from fixtures.brokers import Mosquitto
from fixtures.output import Lines
from fixtures.ports import free_port

pytestmark = pytest.mark.integration

SCHEMA = Path(__file__).parents[2] / "uns-schema" / "payload.schema.json"
PRESS = "acme/pune/stamping/line-3/cell-a/press-01"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stopped_within(proc: Proc, sig: int, timeout: float = 5.0) -> tuple[int, float]:
    """Send ``sig``; the exit code and the seconds it took (AssertionError past ``timeout``)."""
    t0 = time.monotonic()
    proc.p.send_signal(sig)
    try:
        code = proc.p.wait(timeout=timeout)
    except Exception:
        cpu = cpu_seconds(proc.p.pid)
        proc.p.kill()
        raise AssertionError(
            f"{proc.args} still running {timeout} s after {signal.Signals(sig).name}"
            f" ({cpu:.1f} s of CPU so far):\n" + "".join(proc.lines[-5:])
        ) from None
    return code, time.monotonic() - t0


def command(name: str) -> str:
    return json.dumps({"type": "cmd", "ts": 1, "name": name})


# ---- item 14: a broker that goes away and comes back ---------------------------------------


class EmbeddedBroker:
    """`uns broker` as a process, on a fixed port, killable and restartable like `Mosquitto`."""

    def __init__(self, procs: list[Proc]) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._procs = procs
        self._proc: Proc | None = None

    def start(self) -> None:
        self._proc = start(self._procs, "broker", "--port", str(self.port), ready="listening")

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.stop(signal.SIGKILL)
            self._proc = None


@pytest.fixture(params=["mosquitto", "amqtt"])
def restartable_broker(request: pytest.FixtureRequest, procs: list[Proc]) -> Any:
    if request.param == "mosquitto":
        return request.getfixturevalue("mosquitto")
    broker = EmbeddedBroker(procs)
    broker.start()
    return broker


def test_sub_prints_messages_before_and_after_broker_restarts(restartable_broker, procs, prefix):
    broker = restartable_broker
    sub = start(procs, "sub", f"{prefix}/#", "--json", "--broker", broker.url)
    out = Lines(sub.p.stdout, name="stdout")
    for i in range(3):  # the old retry helper died at the first reconnect
        if i:
            broker.kill()
            sub.wait_line("lost")
            broker.start()
            sub.wait_line("reconnected")
        # retained, so that it is there however soon after its reconnect `sub` subscribes
        r = uns("pub", f"{prefix}/n{i}", command(f"n{i}"), "--retain", "--broker", broker.url)
        assert r.returncode == 0, r.stderr
        out.expect(f'"name":"n{i}"')
    assert sub.p.poll() is None, "sub must keep running across broker restarts"
    assert "Traceback" not in "".join(sub.lines), "".join(sub.lines)
    code, _ = stopped_within(sub, signal.SIGINT)
    assert code == 0  # sub's documented code: the broker was reached
    topics = [json.loads(line)["topic"] for _, line in out.lines]
    assert [f"{prefix}/n{i}" for i in range(3)] == sorted(set(topics))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_sub_at_once_while_the_broker_is_away(sig, procs):
    sub = start(procs, "sub", "#", "--broker", f"mqtt://127.0.0.1:{free_port()}", ready="retrying")
    code, took = stopped_within(sub, sig)
    print(f"sub stopped {took:.2f} s after {sig.name}")
    assert code == 1 and "never reached the broker" in "".join(sub.lines)
    assert "Traceback" not in "".join(sub.lines)


def test_sigterm_stops_sub_at_once_after_it_lost_the_broker(mosquitto, procs, prefix):
    r = uns("pub", f"{prefix}/x", command("x"), "--retain", "--broker", mosquitto.url)
    assert r.returncode == 0, r.stderr
    sub = start(procs, "sub", f"{prefix}/#", "--json", "--broker", mosquitto.url)
    Lines(sub.p.stdout, name="stdout").expect(f"{prefix}/x")
    mosquitto.kill()
    sub.wait_line("retrying")
    code, took = stopped_within(sub, signal.SIGTERM)
    print(f"sub stopped {took:.2f} s after SIGTERM")
    assert code == 0 and "Traceback" not in "".join(sub.lines)


@pytest.mark.parametrize(
    "args",
    [
        ("tree",),
        ("pub", "acme/pune/_node/x/cmd", command("x")),
        ("sim", "status"),
        ("sim", "fault", PRESS, "dropout"),
    ],
    ids=["tree", "pub", "sim-status", "sim-fault"],
)
def test_a_signal_stops_every_broker_command_at_once_while_the_broker_is_away(args, procs):
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = start(procs, *args, "--broker", url, ready="retrying")
    code, took = stopped_within(proc, signal.SIGTERM)
    print(f"{args[0]} stopped {took:.2f} s after SIGTERM")
    assert code == 128 + signal.SIGTERM, "".join(proc.lines)
    assert "Traceback" not in "".join(proc.lines)


def test_waiting_for_a_down_broker_costs_almost_no_cpu(procs):
    sub = start(procs, "sub", "#", "--broker", f"mqtt://127.0.0.1:{free_port()}", ready="retrying")
    sub.wait_line("retrying in 1.0 s")  # imports done, in its backoff
    before = cpu_seconds(sub.p.pid)
    time.sleep(5)  # the measurement window itself
    used = cpu_seconds(sub.p.pid) - before
    print(f"sub used {used:.3f} s of CPU in 5 s waiting for the broker")
    assert used < 0.3
    code, _ = stopped_within(sub, signal.SIGTERM)
    assert code == 1


def test_pub_waits_for_a_broker_that_is_not_there_yet(tmp_path, procs, prefix):
    port = free_port()
    pub = start(
        procs,
        "pub",
        f"{prefix}/late",
        command("late"),
        "--retain",
        "--broker",
        f"mqtt://127.0.0.1:{port}",
        ready="retrying",
    )
    broker = Mosquitto(tmp_path, port=port)
    broker.start()
    try:
        assert pub.p.wait(timeout=30) == 0, "".join(pub.lines)
        lines = sub_json(broker.url, f"{prefix}/#", count=1)
        assert lines[0]["payload"]["name"] == "late"
    finally:
        broker.kill()


# ---- item 15: what `uns tree` publishes stays inside the contract -----------------------------


def test_a_plain_subscriber_to_everything_sees_only_contract_messages_while_tree_runs(
    mosquitto, procs
):
    import jsonschema
    import paho.mqtt.client as mqtt

    from uns.topics import parse

    start(procs, "run", "demo", "--broker", mosquitto.url, "--metrics-port", "0", ready="births")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    seen: list[tuple[str, bytes]] = []
    subscribed, fenced = threading.Event(), threading.Event()
    fence = f"acme/pune/_node/fence-{os.getpid()}/cmd"

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        seen.append((message.topic, bytes(message.payload)))
        if message.topic == fence:
            fenced.set()

    # an app that knows only the README: paho, '#', the JSON Schema
    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"naive-{os.getpid()}")
    app.on_message = on_message
    app.on_subscribe = lambda *a: subscribed.set()
    app.connect("127.0.0.1", mosquitto.port)
    app.loop_start()
    try:
        app.subscribe("#", qos=1)
        assert subscribed.wait(10)
        r = uns("tree", "--broker", mosquitto.url)
        assert r.returncode == 0, r.stderr
        assert "demo-01" in r.stdout and "online" in r.stdout
        # published after tree ended: once it is here, whatever tree sent is here too
        app.publish(fence, command("fence"), qos=1).wait_for_publish(10)
        assert fenced.wait(10)
    finally:
        app.loop_stop()
        app.disconnect()
    outside: list[str] = []
    for topic, payload in seen:
        try:
            parse(topic)
        except ValueError as exc:
            outside.append(f"{topic}: {exc}")
        if payload:  # zero-length retained clears are another item's matter
            try:
                validator.validate(json.loads(payload))
            except (ValueError, jsonschema.ValidationError) as exc:
                outside.append(f"{topic} {payload[:60]!r}: {str(exc)[:120]}")
    assert not outside, outside
    assert any(t.endswith("/cmd") and "uns-tree-" in t for t, _ in seen), "tree sent nothing?"


# ---- item 16: config mistakes stop every command with exit 2, naming the field -----------------


def check_exit_2(args: tuple[str, ...], field: str, *, env: dict[str, str] | None = None) -> str:
    r = uns(*args, env={**os.environ, **(env or {})})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert field in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr


def test_a_trailing_newline_in_the_namespace_or_a_node_id_stops_uns_run_with_exit_2(tmp_path):
    config = tmp_path / "plant.yaml"
    config.write_text('namespace: {enterprise: "acme\\n"}\n')
    err = check_exit_2(("run", "demo", "--config", str(config)), "namespace.enterprise")
    assert str(config) in err
    config.write_text('services:\n  demo: {node_id: "demo\\n"}\n')
    check_exit_2(("run", "demo", "--config", str(config)), "services.demo.node_id")


def test_a_trailing_newline_in_a_modbus_path_stops_uns_up_before_it_starts_anything(tmp_path):
    config = tmp_path / "plant.yaml"
    config.write_text(
        "services:\n  modbus-adapter:\n    devices:\n"
        f'      - {{path: "{PRESS}\\n", unit_id: 1,'
        " registers: [{name: t, table: holding, address: 0}]}\n"
    )
    port = free_port()
    err = check_exit_2(
        ("up", "--port", str(port), "--config", str(config)),
        "services.modbus-adapter.devices[0].path",
    )
    assert "started" not in err


def test_simulator_devices_outside_the_plant_stop_uns_run_with_exit_2(tmp_path):
    config = tmp_path / "plant.yaml"
    config.write_text(
        f"plant:\n  devices:\n    - {{path: {PRESS}, asset: press}}\n"
        "services:\n  simulator:\n    devices: [acme/pune/stamping/line-3/cell-a/press-99]\n"
    )
    err = check_exit_2(
        ("run", "simulator", "--config", str(config)), "services.simulator.devices[0]"
    )
    assert "plant.devices" in err


def test_a_device_of_another_site_stops_uns_run_with_exit_2(tmp_path):
    config = tmp_path / "plant.yaml"
    config.write_text(
        f"plant:\n  devices:\n    - {{path: {PRESS.replace('pune', 'delhi')}, asset: press}}\n"
    )
    check_exit_2(("run", "demo", "--config", str(config)), "plant.devices[0].path")


@pytest.mark.parametrize(
    ("how", "args", "env", "named"),
    [
        ("option", ("--broker", "mqtt://edge:hunter2@broker:99999"), {}, "--broker"),
        ("variable", (), {"UNS_BROKER__URL": "mqtt://edge:hunter2@:1883"}, "UNS_BROKER__URL"),
    ],
    ids=["option", "variable"],
)
def test_a_broken_broker_url_stops_with_exit_2_without_showing_its_password(how, args, env, named):
    err = check_exit_2(("sub", "#", *args), named, env=env)
    assert "hunter2" not in err and "edge:***@" in err
    if how == "variable":
        assert "plant.yaml" not in err, "the value came from the variable, not the file"
