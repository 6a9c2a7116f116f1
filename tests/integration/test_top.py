"""`uns top` as a person sees it: in a terminal (tmux, 160x50) against the example plant run
by `uns up`, the screen read back with `tmux capture-pane`; and its `--once` frame."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clitools import Proc, uns
from fixtures.brokers import Mosquitto, need_mosquitto
from fixtures.need import missing
from fixtures.ports import free_port
from uns import (
    DeviceBirth,
    DeviceData,
    Event,
    Metric,
    MetricDef,
    ModelRef,
    NodeBirth,
    connect,
    encode,
    load,
    now_ms,
    plugins,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


class Pane:
    """One command in a 160x50 terminal of a tmux server of its own (a private socket, no
    user config), kept on screen after it exits so that its exit status can be read."""

    def __init__(self, *argv: str) -> None:
        self.socket = f"uns-top-{uuid.uuid4().hex[:8]}"
        self.tmux(
            "new-session", "-d", "-s", "top", "-x", "160", "-y", "50", "-c", str(ROOT),
            shlex.join(argv), ";", "set-option", "-t", "top", "remain-on-exit", "on",
        )  # fmt: skip
        self.pid = int(self.tmux("list-panes", "-t", "top", "-F", "#{pane_pid}"))
        """The command's process (tmux runs it without a shell)."""

    def tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            # the server's environment is the command's: a COLUMNS set here (pytest sets
            # 80) would override the terminal's own size, as no user's shell does
            env={
                **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
                "PYTHONFAULTHANDLER": "1",  # SIGABRT shows where a stuck command is
            },
        )
        assert r.returncode == 0, f"tmux {' '.join(args)}: {r.stderr}"
        return r.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, holds: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The screen once ``holds(screen)``; fails with the last screen after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if holds(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not shown within {timeout:g} s; the screen:\n{text}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def ended(self, how: str, timeout: float = 10) -> str:
        """How the command ended: its exit status, or "signal N". One still running after
        ``timeout`` is aborted, and the failure shows its threads' stacks (faulthandler)."""
        try:
            self.wait_for(lambda s: self.exit_status() is not None, how, timeout)
        except pytest.fail.Exception:
            os.kill(self.pid, signal.SIGABRT)
            self.wait_for(lambda s: self.exit_status() is not None, "the abort", 10)
            history = self.tmux("capture-pane", "-p", "-t", "top", "-S", "-1000")
            pytest.fail(f"{how}: still running after {timeout:g} s; its stacks:\n{history}")
        status = self.exit_status()
        assert status is not None
        return status

    def exit_status(self) -> str | None:
        """None while the command runs. The kernel tells first: tmux sometimes leaves an
        exited command a zombie, its pane alive, for many seconds (tmux 3.3a, seen here)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # reaped: tmux knows how it ended
            dead, status, sig = (
                self.tmux(
                    "list-panes",
                    "-t",
                    "top",
                    "-F",
                    "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}",
                )
                .strip()
                .split(":")
            )
            return (status or f"signal {sig}") if dead == "1" else None
        if stat[0] != "Z":
            return None
        code = int(stat[-1])  # as waitpid(2) reports it
        return str(code >> 8) if code & 0x7F == 0 else f"signal {code & 0x7F}"

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        tmpdir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (tmpdir / self.socket).unlink(missing_ok=True)  # the server leaves it behind


@dataclass
class Plant:
    up: Proc
    url: str
    devices: dict[str, bool]
    """Every device of the example plant, shown without its enterprise/site: scored or not
    (a model of its asset is shipped under models/)."""
    services: list[str]
    """The services `uns up` starts for it."""

    def broker_pid(self) -> int:
        """The embedded broker, a child of `uns up`."""
        for task in Path(f"/proc/{self.up.p.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[2:4] == [b"uns", b"broker"]:
                    return int(pid)
        raise AssertionError("uns up has no broker child")


@pytest.fixture(scope="module")
def tmux() -> None:
    if shutil.which("tmux") is None:
        missing(
            "tmux is not installed",
            ci=".ci/run installs it",
            here="apt-get install tmux to run the terminal tests",
        )


@pytest.fixture(scope="module")
def plant(tmux: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    """The example plant, as the README runs it (`uns up`), on free ports."""
    var = tmp_path_factory.mktemp("plant")
    port = free_port()
    up = Proc(
        "up",
        "--port", str(port),
        "--opcua-port", str(free_port()),
        "--modbus-port", str(free_port()),
        "--metrics-port", "0",
        env={
            "UNS_SERVICES__INFERENCE__MODELS_DIR": str(ROOT / "models"),
            "UNS_SERVICES__INFERENCE__PUBKEY": str(ROOT / "keys/models.pub"),
            "UNS_SERVICES__INFERENCE__AUDIT_LOG": str(var / "model-audit.jsonl"),
            "UNS_SERVICES__BRIDGE__JOURNAL__PATH": str(var / "bridge-journal.sqlite"),
        },
    )  # fmt: skip
    try:
        up.wait_line("namespace on")
        loaded = load(environ={})
        devices = {
            d.path.split("/", 2)[2]: any((ROOT / "models" / d.asset).glob("*/current"))
            for d in loaded.config.plant.devices
        }
        settings = {
            name: loaded.service(name, found.load_settings())
            for name, found in plugins.services().items()
        }
        # what `uns up` starts: enabled, and with something to do (no bridge without a cloud)
        services = [n for n, s in settings.items() if s.enabled and s.idle_reason() is None]
        yield Plant(up, f"mqtt://127.0.0.1:{port}", devices, services)
    finally:
        try:
            up.stop(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            up.stop(signal.SIGKILL)


@pytest.fixture
def top(plant: Plant) -> Iterator[Pane]:
    pane = Pane(sys.executable, "-m", "uns", "top", "--broker", plant.url)
    yield pane
    pane.close()


def rows(screen: str) -> dict[str, list[str]]:
    """The tables' rows by their first cell (a device or a node); cells are two or more
    spaces apart (a cell's own words one)."""
    cells = (re.split(r"\s{2,}", line.strip()) for line in screen.splitlines())
    return {row[0]: row for row in cells if row[0]}


def everything_online(plant: Plant, restarted: bool = False) -> Callable[[str], bool]:
    """Every device online, with a score where a model scores it; every service online (and
    come back once, after a broker restart)."""

    def holds(screen: str) -> bool:
        shown = rows(screen)
        for device, scored in plant.devices.items():
            row = shown.get(device, [])  # device, state, score, ...
            if row[1:2] != ["online"] or len(row) < 3:
                return False
            if (re.fullmatch(r"[\d.e+]+", row[2]) is not None) != scored:
                return False
        for service in plant.services:
            row = shown.get(service, [])  # node, service, version, host, state, up, restarts
            if row[4:5] != ["online"] or (restarted and row[6] == "0"):
                return False
        return f"devices {len(plant.devices)}/{len(plant.devices)} online" in screen

    return holds


def events(screen: str, device: str) -> str:
    """The open events shown on the device's row."""
    row = rows(screen).get(device, [])
    return row[6] if len(row) > 6 else ""


def test_every_device_shows_online_with_its_score_and_a_fault_as_an_open_event(
    plant: Plant, top: Pane
) -> None:
    top.wait_for(everything_online(plant), "every device online with a score", timeout=90)
    device = next(d for d, scored in plant.devices.items() if scored)
    path = f"acme/pune/{device}"

    r = uns("sim", "fault", path, "bearing_wear", "--broker", plant.url)
    assert r.returncode == 0, r.stderr
    screen = top.wait_for(lambda s: "sim_fault" in events(s, device), "the fault's open event")
    assert re.search(r"open events [1-9]", screen)
    assert [d for d in plant.devices if "sim_fault" in events(screen, d)] == [device]

    r = uns("sim", "clear", path, "--broker", plant.url)
    assert r.returncode == 0, r.stderr
    top.wait_for(lambda s: "sim_fault" not in events(s, device), "the event cleared")

    top.keys("q")
    assert top.ended("uns top ending on q") == "0"


def test_it_survives_a_broker_restart_and_ends_on_ctrl_c(plant: Plant, top: Pane) -> None:
    top.wait_for(everything_online(plant), "every device online", timeout=90)
    broker = plant.broker_pid()
    os.kill(broker, signal.SIGKILL)  # `uns up` restarts it; every client reconnects
    top.wait_for(
        everything_online(plant, restarted=True),
        "every service back after the broker restart",
        timeout=60,
    )
    assert "connected since" in top.screen()

    top.keys("C-c")
    assert top.ended("uns top ending on Ctrl-C") == "0"


# ---- --once: one frame, for scripts --------------------------------------------------------


BASE = "acme/pune/stamping/line-3"
SCORED, RUL, ROBOT, CONVEYOR = (
    f"{BASE}/cell-a/press-01",
    f"{BASE}/cell-a/press-02",
    f"{BASE}/cell-b/robot-01",
    f"{BASE}/cell-b/conveyor-01",
)


async def once(publisher: str, viewer: str) -> subprocess.CompletedProcess[str]:
    """`uns top --once` on ``viewer`` (a broker URL) while ``publisher`` does by hand what
    the services would: births, deaths, then scores and an event, again and again."""
    ref = ModelRef(name="press-anomaly", version="1.0.0", sha256="0" * 64)
    anomaly = [MetricDef(name="anomaly_score", datatype="double")]
    life = [MetricDef(name="rul", datatype="double", unit="h", low=0, high=500)]
    raw = [MetricDef(name="bearing_temp", datatype="float", unit="degC")]

    def birth(node: str, device: str, metrics: list[MetricDef]) -> bytes:
        return encode(
            DeviceBirth(ts=now_ms(), node=node, device=device, bdseq=0, seq=1, metrics=metrics)
        )

    def scores(**values: float) -> bytes:
        metrics = [Metric(name=k, value=v) for k, v in values.items()]
        return encode(DeviceData(ts=now_ms(), node="inference", seq=2, metrics=metrics, model=ref))

    async with connect(publisher) as bus:
        for node, url in (
            ("opcua-adapter", f"http://127.0.0.1:{free_port()}/metrics"),  # nobody serves it
            ("inference", ""),
            ("modbus-adapter", ""),
        ):
            await bus.publish(
                f"acme/pune/_node/{node}/birth",
                encode(
                    NodeBirth(
                        ts=now_ms(),
                        node=node,
                        service=node,
                        bdseq=0,
                        host="edge-1",
                        metrics_url=url,
                    )
                ),
                retain=True,
            )
        await bus.publish(
            "acme/pune/_node/modbus-adapter/death",
            b'{"type":"ndeath","ts":1,"node":"modbus-adapter","bdseq":0,"reason":"lost"}',
            retain=True,
        )
        for device, node, metrics in (
            (SCORED, "opcua-adapter", raw),
            (RUL, "opcua-adapter", raw),
            (CONVEYOR, "opcua-adapter", raw),
            (ROBOT, "modbus-adapter", raw),
            (SCORED, "inference", anomaly),
            (RUL, "inference", life),
        ):
            stream = "raw" if node != "inference" else "scores"
            await bus.publish(f"{device}/{stream}/birth", birth(node, device, metrics), retain=True)
        await bus.publish(
            f"{CONVEYOR}/raw/death",
            b'{"type":"ddeath","ts":1,"node":"opcua-adapter","device":"d","bdseq":0,"seq":3,'
            b'"reason":"BadCommunicationError"}',
            retain=True,
        )
        event = Event(
            ts=now_ms(), id="e1", kind="anomaly", state="raised", device=SCORED,
            started=now_ms(), severity="critical", score=7.3, threshold=5.0,
        )  # fmt: skip

        top = asyncio.create_task(
            asyncio.to_thread(uns, "top", "--once", "--wait", "2", "--broker", viewer)
        )
        while not top.done():  # what the services keep sending while it watches
            await bus.publish(
                f"{SCORED}/scores/data", scores(anomaly_score=7.3, anomaly_threshold=5.0), qos=0
            )
            await bus.publish(f"{RUL}/scores/data", scores(rul=120.5), qos=0)
            await bus.publish(f"{SCORED}/events/anomaly", encode(event), qos=0)
            await asyncio.sleep(0.1)
        return await top


async def test_once_prints_what_the_namespace_says_of_each_device_and_node(amqtt_broker):
    r = await once(amqtt_broker.url, amqtt_broker.url)
    assert r.returncode == 0, r.stderr
    shown = rows(r.stdout)
    cell_a, cell_b = "stamping/line-3/cell-a", "stamping/line-3/cell-b"
    # device, state, score, threshold, rul, model, open events (then the rate, last seen)
    assert shown[f"{cell_a}/press-01"][1:7] == [
        "online", "7.30", "5.00", "-", "press-anomaly@1.0.0", "anomaly critical",
    ]  # fmt: skip
    assert shown[f"{cell_a}/press-02"][1:7] == [
        "online",
        "-",
        "-",
        "120.50 h",
        "press-anomaly@1.0.0",
        "-",
    ]
    assert shown[f"{cell_a}/press-03"][1:3] == ["no birth", "no model"]
    assert shown[f"{cell_b}/robot-01"][1:3] == ["offline (node modbus-adapter offline)", "no model"]
    assert shown[f"{cell_b}/conveyor-01"][1:3] == ["offline (BadCommunicationError)", "no model"]
    # heard from: press-01 by its scores; the robot only by a retained birth from before
    assert shown[f"{cell_a}/press-01"][8].endswith(" s ago")
    assert shown[f"{cell_b}/robot-01"][7:] == ["0.0", "-"]
    # node, service, version, host, state, up, restarts, connected (then reconnects, ...)
    assert shown["opcua-adapter"][1:5] == ["opcua-adapter", "-", "edge-1", "online"]
    assert shown["opcua-adapter"][7] == "no /metrics (URLError)"
    assert shown["modbus-adapter"][4] == "offline (lost)"
    assert "devices 2/6 online" in r.stdout and "open events 1" in r.stdout


@pytest.mark.mosquitto
async def test_a_read_only_credential_is_enough(tmp_path: Path) -> None:
    """On Mosquitto with an ACL that lets the viewer read and nothing else (its own publish
    is refused): top subscribes only, so it shows all of it; the password stays out of
    what it prints."""
    need_mosquitto()
    acl = tmp_path / "acl"
    acl.write_text("user services\ntopic readwrite #\n\nuser viewer\ntopic read #\n")
    users = {"services": "s3rvices-pw", "viewer": "v1ewer-pw"}
    broker = Mosquitto(tmp_path, users=users, login="services", extra=f"acl_file {acl}\n")
    broker.start()
    viewer = f"mqtt://viewer:v1ewer-pw@127.0.0.1:{broker.port}"
    try:
        async with connect(viewer) as bus:  # refused by the ACL (MQTT 3.1.1: silently)
            intruder = NodeBirth(ts=now_ms(), node="intruder", service="x", bdseq=0)
            await bus.publish("acme/pune/_node/intruder/birth", encode(intruder), retain=True)
        r = await once(broker.url, viewer)
    finally:
        broker.kill()
    assert r.returncode == 0, r.stderr
    shown = rows(r.stdout)
    assert shown[SCORED.split("/", 2)[2]][1:4] == ["online", "7.30", "5.00"]
    assert "open events 1" in r.stdout
    assert "intruder" not in r.stdout  # the viewer may read, not write
    assert "v1ewer-pw" not in r.stdout + r.stderr


def test_once_exits_1_when_the_broker_is_never_reached() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    r = uns("top", "--once", "--wait", "1", "--broker", url)
    assert r.returncode == 1
    assert f"never reached the broker at {url}" in r.stderr


def test_without_a_terminal_it_says_to_use_once() -> None:
    r = uns("top", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert "--once prints one frame" in r.stderr
