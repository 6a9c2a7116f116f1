"""The example plant as a user runs it: `uns up` on a real Mosquitto, a cloud behind a WAN.

* the local broker: Mosquitto on a free port, a password (given to `uns up` in the
  ``--broker`` URL), persistence as in deploy/mosquitto (so it can be ``kill -9``ed and
  restarted on the same port with what it had saved);
* the cloud: a second Mosquitto with its own password, reached by the bridge through
  `Wan`, a TCP proxy standing for the WAN link (cut = connections reset and refused);
* `uns up` of uns-schema/plant.yaml (a generated copy: the bridge's remote, an OPC UA
  user and password, absolute model paths, the journal and audit log in the run's
  directory), metrics on free ports, the simulator's OPC UA and Modbus servers on free
  ports;
* two watchers (`observer.Watcher`): every local message, every cloud message.

The services are `uns up`'s children: their pids come from /proc (the supervisor's
children whose command line is ``-m uns run NAME``), their /metrics from their node
births. All of the run's output (`uns up` and both brokers) is kept for the secrets check.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fixtures.brokers import Mosquitto
from fixtures.output import Output
from fixtures.ports import free_port
from fixtures.proxy import Proxy
from system.observer import Loop, Publisher, Seen, State, Watcher
from uns.topics import matches

ROOT = Path(__file__).resolve().parents[2]
ENTERPRISE, SITE = "acme", "pune"
SERVICES = ("bridge", "featurizer", "inference", "modbus-adapter", "opcua-adapter", "simulator")
"""The pipeline's services, which the suite hurts and checks one by one."""
RUNNING = (*SERVICES, "plant")
"""What `uns up` runs for the example plant (demo is disabled there): the pipeline and the
plant view (line health), which the faults do not target yet."""
FORWARDED = (
    "+/+/+/+/+/+/features/#",
    "+/+/+/+/+/+/scores/#",
    "+/+/+/+/+/+/events/#",
    "+/+/_node/+/birth",
    "+/+/_node/+/death",
)
"""The bridge's DEFAULT_INCLUDE (uns_bridge.settings), repeated here on purpose: the suite
checks what the README promises the cloud gets."""


def secret(label: str) -> str:
    """A password nobody could mistake for other text in a log: easy to grep for."""
    return f"{label}-{uuid.uuid4().hex[:20]}"


def _broker(
    workdir: Path, name: str, user: str, password: str, *, persistent: bool, extra: str
) -> Mosquitto:
    """A Mosquitto with one user and its password (given to clients in `Mosquitto.url`);
    restartable on the same port; ``$SYS`` every 2 s."""
    return Mosquitto(
        workdir,
        name=name,
        users={user: password},
        login=user,
        persistent=persistent,
        extra=f"sys_interval 2\n{extra}",
    )


class Wan:
    """A TCP proxy standing for the WAN between the bridge and the cloud (`Proxy`, on a loop
    of its own thread: the suite's tests are synchronous): ``cut()`` resets every connection
    and refuses new ones until ``mend()``."""

    def __init__(self, target: int) -> None:
        self._loop = Loop("wan")
        self.proxy = self._loop.call(Proxy(target).start())
        self.port = self.proxy.port

    def cut(self) -> None:
        self._loop.call(self._now(self.proxy.cut))

    def mend(self) -> None:
        self._loop.call(self._now(self.proxy.mend))

    @staticmethod
    async def _now(action: Callable[[], None]) -> None:
        action()  # on the proxy's loop: its connections live there

    def close(self) -> None:
        self._loop.call(self.proxy.close())
        self._loop.close()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            out += [int(x) for x in text.split()]
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process from /proc (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value}, plus a total per metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = v
        base = name.split("{", 1)[0]
        out[base + "#sum"] = out.get(base + "#sum", 0.0) + v
    return out


@dataclass
class Fault:
    """One fault applied to the running plant: when it started and ended (wall time)."""

    name: str
    start: float
    end: float = 0.0
    bridge_down: bool = False
    """Whether the bridge (or the broker in front of it) was down: messages published
    then were never taken by it, so they are not held against it."""
    figures: dict[str, Any] = field(default_factory=dict)


class System:
    """The running plant and the means to hurt it and to see what consumers saw."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.secrets = {
            "local broker password": secret("lbpw"),
            "cloud broker password": secret("clpw"),
            "OPC UA user password": secret("uapw"),
        }
        self.local = _broker(
            workdir,
            "local",
            "uns",
            self.secrets["local broker password"],
            persistent=True,
            extra="max_queued_messages 10000\n",  # as deploy/mosquitto/mosquitto.conf
        )
        self.cloud = _broker(
            workdir,
            "cloud",
            "pune-edge",
            self.secrets["cloud broker password"],
            persistent=False,
            # the cloud application must not be the one that loses messages
            extra="max_queued_messages 0\n",
        )
        self.local.start()
        self.cloud.start()
        self.wan = Wan(self.cloud.port)
        self.opcua_port, self.modbus_port = free_port(), free_port()
        self.config = self._write_config()
        self.faults: list[Fault] = []
        self.unhealthy = False
        """Set when a case found the plant not recovering (see the plant fixture)."""
        self.kills: dict[str, int] = {}
        """Services the suite killed on purpose, and how often."""
        self.cli_output: list[str] = []
        """What every `uns` command run against the plant printed."""
        self.fuzzed: set[tuple[str, bytes]] = set()
        """(topic, digest) of every message the fuzz test published."""
        self.lost: set[tuple[str, bytes]] = set()
        """Messages already reported lost by an earlier case (each is reported once)."""
        self.up: subprocess.Popen[str] | None = None
        self.log: Output | None = None
        self.started_at = 0.0
        self.watch = Watcher(
            "local",
            self.local.url,
            ["acme/#", "$SYS/broker/publish/messages/dropped"],
            client_id="system-watch-local",
        )
        self.cloud_watch = Watcher("cloud", self.cloud.url, ["#"], client_id="system-watch-cloud")
        self.pub = Publisher(self.local.url, "system-publisher")
        for w in (self.watch, self.cloud_watch):
            if not w.connected.wait(30):
                raise RuntimeError(f"watcher {w.name} did not connect")

    # ---- the config and `uns up` ------------------------------------------------------

    def _write_config(self) -> Path:
        data = yaml.safe_load((ROOT / "uns-schema" / "plant.yaml").read_text())
        services = data["services"]
        services["inference"].update(
            models_dir=str(ROOT / "models"),
            pubkey=str(ROOT / "keys" / "models.pub"),
            audit_log=str(self.dir / "var" / "model-audit.jsonl"),
        )
        services["bridge"] = {
            "remote": {
                "url": f"mqtt://127.0.0.1:{self.wan.port}",
                "allow_plaintext": True,  # the loopback test cloud only
                "username": self.cloud.user,
                "password": self.secrets["cloud broker password"],
                "reconnect_max_s": 5.0,
            },
            "journal": {"path": str(self.dir / "var" / "bridge-journal.sqlite")},
        }
        services["opcua-adapter"]["username"] = "plant-reader"
        services["opcua-adapter"]["password"] = self.secrets["OPC UA user password"]
        path = self.dir / "plant.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_up(self) -> None:
        """`uns up`, as the README runs it, against the local Mosquitto."""
        argv = [
            sys.executable,
            "-m",
            "uns",
            "up",
            "--broker",
            self.local.url,
            "--metrics-port",
            "0",
            "--opcua-port",
            str(self.opcua_port),
            "--modbus-port",
            str(self.modbus_port),
            "--config",
            str(self.config),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
        self.started_at = time.time()
        self.up = subprocess.Popen(
            argv,
            cwd=self.dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log = Output(self.up, self.dir / "uns-up.log")

    def stop_up(self) -> int | None:
        if self.up is None:
            return None
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                return self.up.wait(60)
            except subprocess.TimeoutExpired:
                for pid in self.pids().values():
                    os.kill(pid, signal.SIGKILL)
                self.up.kill()
        return self.up.wait(10)

    def close(self) -> None:
        self.stop_up()
        for closing in (self.watch, self.cloud_watch, self.pub, self.wan):
            try:
                closing.close()
            except Exception:
                pass
        self.local.kill()
        self.cloud.kill()

    # ---- the services as processes ----------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Each service's pid: `uns up`'s children running ``-m uns run NAME``."""
        assert self.up is not None
        found: dict[str, int] = {}
        for pid in _children(self.up.pid):
            argv = _cmdline(pid)
            if "run" in argv:
                i = argv.index("run")
                if i + 1 < len(argv):
                    found[argv[i + 1]] = pid
        return found

    def pid(self, service: str, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pids().get(service)
            if pid:
                return pid
            time.sleep(0.1)
        raise AssertionError(f"{service} is not running under uns up")

    def kill(self, service: str) -> int:
        """``kill -9`` a service (counted: `uns up` restarting it is then no surprise)."""
        pid = self.pid(service)
        os.kill(pid, signal.SIGKILL)
        self.kills[service] = self.kills.get(service, 0) + 1
        return pid

    def restarts(self, since: float = 0.0) -> dict[str, int]:
        """`uns up`'s own account of children that exited (and were restarted)."""
        assert self.log is not None
        counts: dict[str, int] = {}
        for line in self.log.since(since):
            m = re.search(r"uns\.supervisor: (\S+) exited with code", line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def tracebacks(self, since: float = 0.0) -> int:
        assert self.log is not None
        return sum("Traceback (most recent call last)" in line for line in self.log.since(since))

    # ---- what a consumer sees -------------------------------------------------------------

    @staticmethod
    def node_topic(node: str, message: str) -> str:
        return f"{ENTERPRISE}/{SITE}/_node/{node}/{message}"

    def online(self, state: State, node: str, since_ms: int = 0) -> Seen | None:
        """The node's last birth if it is online with a birth created at or after
        ``since_ms`` (its death topic cleared or older), else None."""
        birth = state.last.get(self.node_topic(node, "birth"))
        if birth is None or birth.type != "nbirth" or (birth.ts or 0) < since_ms:
            return None
        death = state.last.get(self.node_topic(node, "death"))
        if death is not None and death.t > birth.t:
            return None
        return birth

    def wait_online(
        self, nodes: Iterable[str] = SERVICES, since: float = 0.0, timeout: float = 120
    ) -> dict[str, float]:
        """Wait for a fresh birth of every node; return node -> seconds after ``since``
        that its birth arrived."""
        nodes = list(nodes)
        since_ms = int(since * 1000)

        def all_online(state: State) -> dict[str, float] | None:
            births = {n: self.online(state, n, since_ms) for n in nodes}
            if all(births.values()):
                return {n: round(b.t - since, 2) for n, b in births.items() if b}
            return None

        return self.watch.until(all_online, timeout, f"fresh births of {nodes}")

    def metrics_url(self, service: str) -> str:
        with self.watch.cond:
            birth = self.watch.state.last.get(self.node_topic(service, "birth"))
        assert birth is not None and birth.metrics_url, f"{service}: no metrics url in its birth"
        return birth.metrics_url

    def metrics(self, service: str, timeout: float = 10) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url(service), timeout=timeout) as r:
            return parse_metrics(r.read().decode())

    def metrics_text(self, service: str) -> str:
        with urllib.request.urlopen(self.metrics_url(service), timeout=10) as r:
            text: str = r.read().decode()
            return text

    def dropped(self, service: str) -> dict[str, float]:
        """``uns_messages_dropped_total`` by reason."""
        out: dict[str, float] = {}
        for key, value in self.metrics(service).items():
            if key.startswith("uns_messages_dropped_total{"):
                m = re.search(r'reason="([^"]*)"', key)
                out[m.group(1) if m else "?"] = value
        return out

    def uns(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """The `uns` command against this plant (its config, its broker)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNS_")}
        done = subprocess.run(
            [sys.executable, "-m", "uns", *args, "--broker", self.local.url],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.cli_output.append(f"$ uns {' '.join(args)}\n{done.stdout}{done.stderr}")
        return done

    def command(self, node: str, name: str, **args: Any) -> None:
        payload = json.dumps(
            {
                "type": "cmd",
                "ts": int(time.time() * 1000),
                "name": name,
                "args": args,
                "sender": "system-suite",
            }
        ).encode()
        self.pub.publish(self.node_topic(node, "cmd"), payload, qos=1)

    # ---- the bridge's ledger ------------------------------------------------------------

    def forwarded(self, topic: str) -> bool:
        """Whether the bridge forwards ``topic``: its own birth and death are not (the
        cloud hears of it from its link: a birth per connection, its death the will)."""
        own = self.node_topic("bridge", "")
        return any(matches(f, topic) for f in FORWARDED) and not topic.startswith(own)

    def bridge_down_intervals(self, margin: float) -> list[tuple[float, float]]:
        """Intervals in which messages seen locally cannot be held against the bridge:
        from ``margin`` s before a fault that stopped it (its intake between receipt and
        commit, or the broker's socket buffers) until its fresh birth arrived locally."""
        out = []
        for fault in self.faults:
            if fault.bridge_down:
                back = fault.figures.get("bridge_back_at", fault.end)
                out.append((fault.start - margin, max(back, fault.end)))
        return out

    def ledger(self, since: float, until: float, margin: float = 2.0) -> dict[str, Any]:
        """Every non-empty message the local watcher saw on the forwarded streams in
        [since, until] while the bridge was up, against what reached the cloud (the fuzz
        test's own messages are accounted for by that test)."""
        down = self.bridge_down_intervals(margin)
        local = [
            s
            for s in self.watch.snapshot(since, until)
            if s.size and self.forwarded(s.topic) and s.key not in self.fuzzed
        ]
        cloud: dict[tuple[str, bytes], int] = {}
        for s in self.cloud_watch.snapshot(since - 5):
            cloud[s.key] = cloud.get(s.key, 0) + 1
        up = [s for s in local if not any(a <= s.t <= b for a, b in down)]
        in_down = [s for s in local if any(a <= s.t <= b for a, b in down)]
        want: dict[tuple[str, bytes], int] = {}
        for s in up:
            want[s.key] = want.get(s.key, 0) + 1
        missing = [k for k, n in want.items() if cloud.get(k, 0) < n]
        missing_down = [s for s in in_down if s.key not in cloud]
        dupes = sum(max(0, n - want[k]) for k, n in cloud.items() if k in want)
        return {
            "seen_up": len(up),
            "missing_up": len(missing),
            "missing_keys": missing,
            "missing_examples": [t for t, _ in missing[:5]],
            "seen_while_down": len(in_down),
            "missing_while_down": len(missing_down),
            "duplicates_at_cloud": dupes,
            "down_intervals": [
                (round(a - self.started_at, 1), round(b - self.started_at, 1))
                for a, b in down
                if b >= since and a <= until
            ],
            "missing_while_down_examples": sorted({s.topic for s in missing_down})[:8],
        }

    def wait_ledger(
        self, since: float, until: float, timeout: float = 120, settle: float = 20
    ) -> dict[str, Any]:
        """The ledger once nothing taken is missing at the cloud; or once the missing
        ones stopped arriving for ``settle`` s (the bridge's journal drained); or after
        ``timeout``."""
        started = time.monotonic()
        best, best_at = None, started
        while True:
            result = self.ledger(since, until)
            now = time.monotonic()
            if best is None or result["missing_up"] < best:
                best, best_at = result["missing_up"], now
            if result["missing_up"] == 0 or now - best_at > settle or now - started > timeout:
                result["waited_s"] = round(now - started, 1)
                return result
            time.sleep(1)

    def wait_flowing(
        self, since: float, timeout: float = 180, births_since: float | None = None
    ) -> dict[str, float]:
        """Wait until the whole pipeline runs again after ``since``: every service online
        (a birth after ``births_since``, default ``since``), raw data and features from
        every device, scores from every scored one. Return how long each took (s after
        ``since``)."""
        took: dict[str, float] = {}
        births = self.wait_online(
            SERVICES, since if births_since is None else births_since, timeout
        )
        took["services_online_s"] = round(max(time.time() - since, 0.0), 2)
        if births_since is None:
            took["services_online_s"] = max(births.values())
        for stream, devices in (("raw", DEVICES), ("features", DEVICES), ("scores", SCORED)):
            try:
                self.watch.until(
                    lambda st, s=stream, d=devices: flowing(st, since, [s], d),
                    timeout,
                    f"{stream} data from {sorted(devices)}",
                )
            except AssertionError as e:
                raise AssertionError(f"{e}\n{self.diagnosis(since, stream, devices)}") from None
            took[f"{stream}_flowing_s"] = round(time.time() - since, 2)
        return took

    def diagnosis(self, since: float, stream: str, devices: Iterable[str]) -> str:
        """What a failed wait leaves for the reader of a CI log (which has nothing else):
        the devices that sent nothing, what the broker saw of them, and `uns up`'s tail."""
        with self.watch.cond:
            last = dict(self.watch.state.last)
        lines = []
        for d in sorted(devices):
            s = last.get(f"{d}/{stream}/data")
            if s is None or s.t < since:
                mine = sorted(t for t in last if t.startswith(d + "/"))
                lines.append(f"  {d}: nothing on {stream}/data; its topics seen: {mine}")
        assert self.log is not None
        tail = "".join(self.log.since(0.0)[-60:])
        return "devices without data:\n" + "\n".join(lines) + "\nuns up (last 60 lines):\n" + tail

    def mark_startup(self) -> None:
        """Until the bridge's first birth nothing could be taken: a 'fault' for the ledger."""
        with self.watch.cond:
            births = [
                x
                for x in self.watch.state.seen
                if x.type == "nbirth" and x.node == "bridge" and not x.retain
            ]
        back = births[0].t if births else time.time()
        self.faults.append(
            Fault(
                "startup", self.started_at, back, bridge_down=True, figures={"bridge_back_at": back}
            )
        )

    def fault(self, name: str, *, bridge_down: bool = False) -> Fault:
        f = Fault(name, time.time(), bridge_down=bridge_down)
        self.faults.append(f)
        return f


def last_of(state: State, prefix: str, suffix: str) -> dict[str, Seen]:
    """Topic -> last message, for topics under ``prefix`` ending in ``suffix``."""
    return {t: s for t, s in state.last.items() if t.startswith(prefix) and t.endswith(suffix)}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(every)


def plant_devices() -> dict[str, str]:
    """Device path -> asset type of the example plant."""
    data = yaml.safe_load((ROOT / "uns-schema" / "plant.yaml").read_text())
    return {d["path"]: d["asset"] for d in data["plant"]["devices"]}


DEVICES = plant_devices()
SCORED = sorted(d for d, a in DEVICES.items() if (ROOT / "models" / a / "anomaly").is_dir())
"""The devices the shipped models score (presses and the conveyor)."""


def flowing(state: State, since: float, streams: Iterable[str], devices: Iterable[str]) -> bool:
    """Whether every device has sent data on every stream after ``since``."""
    return all(
        (s := state.last.get(f"{d}/{stream}/data")) is not None and s.t >= since
        for d in devices
        for stream in streams
    )
