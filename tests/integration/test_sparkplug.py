"""Sparkplug B 3.0 on the wire, checked by an implementation we did not write.

Every message the north edge node (`uns run sparkplug`) publishes is decoded by
pysparkplug 0.6.1 (tests/integration/sparkplug_peer.py, in its own virtual environment:
it needs paho-mqtt < 2) and held to the host application's rules: births before data,
the bdSeq of the NDEATH will equal to the NBIRTH's, seq continuity, every DDATA metric
known from a birth, a rebirth on NCMD, the primary host's STATE. The south adapter is fed
by pysparkplug's own EdgeNode.

pysparkplug is found at ``UNS_PYSPARKPLUG_PYTHON`` (default
``~/.cache/uns-pysparkplug-0.6.1/bin/python``; ``.ci/run`` installs it there): skipped
where absent, failed in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.brokers import AmqttBroker, Mosquitto
from fixtures.need import missing
from uns import DeviceBirth, DeviceData, DeviceDeath, Event, Metric, MetricDef, Waveform, now_ms
from uns.testing import running, watching
from uns_sparkplug.north import SparkplugNode

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("sparkplug_peer.py")
PEER_VERSION = "0.6.1"
ENT, SITE = "acme", "pune"
PRESS = f"{ENT}/{SITE}/stamping/line-3/cell-a/press-01"
ROBOT = f"{ENT}/{SITE}/stamping/line-3/cell-b/robot-01"
PRESS_ID, ROBOT_ID = "stamping.line-3.cell-a.press-01", "stamping.line-3.cell-b.robot-01"


def peer_python() -> str:
    default = Path.home() / f".cache/uns-pysparkplug-{PEER_VERSION}/bin/python"
    python = os.environ.get("UNS_PYSPARKPLUG_PYTHON") or str(default)
    if not Path(python).exists():
        missing(
            f"pysparkplug not found ({python})",
            ci=".ci/run must install pysparkplug and set UNS_PYSPARKPLUG_PYTHON",
            here=f"python3 -m venv {default.parent.parent} && {default.parent}/pip install"
            f" pysparkplug=={PEER_VERSION}",
        )
    return python


class Peer:
    """pysparkplug in a subprocess: JSON lines in, JSON lines out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.cursor = 0
        self.changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(json.loads(raw))
            self.changed.set()
        self.changed.set()

    async def next(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        """The next line (after the last one returned) that ``predicate`` accepts."""
        async with asyncio.timeout(timeout):
            while True:
                while self.cursor < len(self.lines):
                    line = self.lines[self.cursor]
                    self.cursor += 1
                    if predicate(line):
                        return line
                if self._reader.done():
                    raise AssertionError(f"the peer ended: {self.lines[-5:]}")
                self.changed.clear()
                await self.changed.wait()

    async def of(self, kind: str, device: str | None = None) -> dict[str, Any]:
        return await self.next(
            lambda m: m["type"] == kind and (device is None or m.get("device") == device)
        )

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        at = self.cursor
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        await self.next(lambda m: m["type"] == "DONE" and m["op"] == cmd["op"])
        self.cursor = at  # what came meanwhile is still to be read

    async def kill(self) -> None:
        """Tell an edge peer to vanish (no DISCONNECT: the broker sends its will)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "kill"}\n')
        await self.proc.stdin.drain()
        await self.proc.wait()

    async def born(self, expected: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
        """DBIRTHs until each device's latest one has (at least) the metrics expected
        (a device is born again as the births of its streams arrive)."""
        latest: dict[str, dict[str, Any]] = {}
        while any(
            d not in latest or not names <= set(by_name(latest[d])) for d, names in expected.items()
        ):
            m = await self.of("DBIRTH")
            latest[m["device"]] = m
        return latest

    async def data_with(self, device: str, name: str, value: Any) -> dict[str, Any]:
        """The next DDATA of ``device`` carrying ``name`` = ``value``."""
        return await self.next(
            lambda m: (
                m["type"] == "DDATA"
                and m["device"] == device
                and any(x["name"] == name and x["value"] == value for x in m["metrics"])
            )
        )

    def messages(self) -> list[dict[str, Any]]:
        return [m for m in self.lines if m["type"] not in ("DONE", "READY", "SUBSCRIBED")]


async def _peer(*args: str) -> AsyncIterator[Peer]:
    proc = await asyncio.create_subprocess_exec(
        peer_python(),
        str(PEER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    peer = Peer(proc)
    try:
        yield peer
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        peer._reader.cancel()


@pytest.fixture(params=["mosquitto", "amqtt"])
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "mosquitto":
        from fixtures.brokers import started_mosquitto

        m = started_mosquitto(tmp_path)
        yield m
        m.kill()
    else:
        from fixtures.ports import free_port

        a = AmqttBroker(free_port())
        await a.start()
        yield a
        await a.stop()


@pytest.fixture
async def observer(broker: Any) -> AsyncIterator[Peer]:
    peer_python()
    async for peer in _peer("observe", str(broker.port)):
        await peer.of("READY")
        yield peer


# ---- the namespace the north side mirrors ---------------------------------------------

RAW_DEFS = [
    MetricDef(name="temperature", datatype="double", unit="degC", low=0, high=120),
    MetricDef(name="running", datatype="bool"),
    MetricDef(name="strokes", datatype="int64"),
    MetricDef(name="offset", datatype="int16"),
    MetricDef(name="vibration", datatype="waveform", unit="g", rate_hz=10000),
]
FEATURE_DEFS = [MetricDef(name="rms", datatype="float", unit="g")]


def birth(device: str, stream_defs: list[MetricDef]) -> DeviceBirth:
    return DeviceBirth(
        ts=now_ms(), node="adapter", device=device, bdseq=0, seq=0, metrics=stream_defs
    )


def data(*metrics: Metric) -> DeviceData:
    return DeviceData(ts=now_ms(), node="adapter", seq=1, metrics=list(metrics))


def by_name(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in message["metrics"]}


# ---- the host application's rules ------------------------------------------------------


def check_host_rules(messages: list[dict[str, Any]], edge: str = SITE) -> None:
    """What a Sparkplug host application requires of an edge node, over everything seen."""
    errors = [m for m in messages if m["type"] == "ERROR"]
    assert not errors, f"pysparkplug could not decode: {errors}"
    mine = [m for m in messages if m.get("edge") == edge and m["type"] != "STATE"]
    bdseq: int | None = None
    seq: int | None = None
    born: dict[str, set[str]] = {}  # device -> metric names of its DBIRTH
    for m in mine:
        kind = m["type"]
        assert not m["retain"], f"{kind} must not be retained"
        if kind == "NCMD" or kind == "DCMD":
            continue
        if kind == "NDEATH":
            assert bdseq is not None, "NDEATH before any NBIRTH"
            assert [x["name"] for x in m["metrics"]] == ["bdSeq"]
            assert m["metrics"][0]["value"] == bdseq, "NDEATH bdSeq differs from the NBIRTH's"
            assert m["seq"] is None, "an NDEATH has no seq"
            bdseq, seq, born = None, None, {}
            continue
        if kind == "NBIRTH":
            assert m["seq"] == 0
            names = by_name(m)
            assert names["Node Control/Rebirth"]["value"] is False
            assert names["Node Control/Rebirth"]["datatype"] == "BOOLEAN"
            bdseq, seq, born = names["bdSeq"]["value"], 0, {}
            continue
        assert seq is not None, f"{kind} before the NBIRTH"
        assert m["seq"] == (seq + 1) % 256, f"seq {m['seq']} after {seq} ({kind})"
        seq = m["seq"]
        if kind == "DBIRTH":
            born[m["device"]] = {x["name"] for x in m["metrics"]}
            for x in m["metrics"]:
                assert x["alias"] is not None and x["datatype"] != "UNKNOWN"
        elif kind == "DDATA":
            assert m["device"] in born, f"DDATA of {m['device']} before its DBIRTH"
            for x in m["metrics"]:
                assert x["name"] in born[m["device"]], f"{x['name']} not in the DBIRTH"
        elif kind == "DDEATH":
            born.pop(m["device"], None)
    aliases: dict[int, str] = {}
    for m in mine:
        if m["type"] in ("DBIRTH", "NBIRTH"):
            for x in m["metrics"]:
                key = f"{m.get('device')}/{x['name']}"
                assert aliases.setdefault(x["alias"], key) == key, "an alias names two metrics"


# ---- north -------------------------------------------------------------------------


async def test_the_namespace_as_an_edge_node_decoded_by_pysparkplug(
    broker: Any, observer: Peer
) -> None:
    async with watching(broker.url, f"{ENT}/#") as ns:
        await ns.publish(f"{PRESS}/raw/birth", birth(PRESS, RAW_DEFS), retain=True)
        await ns.publish(f"{PRESS}/features/birth", birth(PRESS, FEATURE_DEFS), retain=True)
        await ns.publish(f"{ROBOT}/raw/birth", birth(ROBOT, RAW_DEFS[:2]), retain=True)
        t0 = now_ms() - 5000
        await ns.publish(
            f"{PRESS}/raw/data",
            data(
                Metric(name="temperature", value=61.5, ts=t0),
                Metric(name="running", value=True, ts=t0),
                Metric(name="strokes", value=2**40, ts=t0),
                Metric(name="offset", value=-3, ts=t0),
            ),
            retain=True,
        )
        async with running(SparkplugNode, broker.url, ENT, site=SITE, enabled=True) as node:
            nbirth = await observer.of("NBIRTH")
            assert nbirth["topic"] == f"spBv1.0/{ENT}/NBIRTH/{SITE}"
            await observer.born(
                {PRESS_ID: {"raw/temperature", "features/rms"}, ROBOT_ID: {"raw/running"}}
            )
            dbirths = {PRESS_ID, ROBOT_ID}

            # values, datatypes, units and source timestamps
            await ns.publish(
                f"{PRESS}/raw/data",
                data(
                    Metric(name="temperature", value=62.25, ts=t0 + 1000),
                    Metric(name="vibration", value=Waveform.from_values([0.1], t0_us=0, rate_hz=1)),
                ),
            )
            ddata = await observer.data_with(PRESS_ID, "raw/temperature", 62.25)
            assert [(x["name"], x["value"], x["timestamp"]) for x in ddata["metrics"]] == [
                ("raw/temperature", 62.25, t0 + 1000)
            ]
            await ns.publish(
                f"{PRESS}/raw/data",
                data(Metric(name="temperature", value=0.0, quality="bad", reason="BadSensor")),
            )
            bad = by_name(await observer.data_with(PRESS_ID, "raw/temperature", 0.0))[
                "raw/temperature"
            ]
            assert bad["properties"] == {"Quality": 0, "qualityReason": "BadSensor"}
            await ns.publish(f"{PRESS}/features/data", data(Metric(name="rms", value=0.5)))
            rms = by_name(await observer.data_with(PRESS_ID, "features/rms", 0.5))["features/rms"]
            assert (rms["datatype"], rms["value"]) == ("FLOAT", 0.5)

            # an event adds metrics: the device is born again with them
            event = Event(
                ts=now_ms(), id="e1", kind="anomaly", state="raised", device=PRESS,
                started=now_ms(), severity="critical", score=0.93,
            )  # fmt: skip
            await ns.publish(f"{PRESS}/events/anomaly", event)
            await observer.of("DDEATH", PRESS_ID)
            reborn = by_name((await observer.born({PRESS_ID: {"events/anomaly/state"}}))[PRESS_ID])
            assert reborn["events/anomaly/state"]["value"] == "raised"
            assert reborn["events/anomaly/score"]["value"] == 0.93
            temp = reborn["raw/temperature"]
            assert (temp["datatype"], temp["value"]) == ("DOUBLE", 0.0)
            assert temp["properties"]["engUnit"] == "degC"
            assert temp["properties"]["engHigh"] == 120
            assert temp["properties"]["Quality"] == 0
            assert reborn["raw/strokes"]["value"] == 2**40
            assert reborn["raw/offset"]["value"] == -3
            assert reborn["raw/offset"]["datatype"] == "INT16"
            assert "raw/vibration" not in reborn, "waveforms are mirrored only by opt-in"

            # NCMD rebirth: NBIRTH and every DBIRTH again, same bdSeq
            await observer.send(op="rebirth", group=ENT, edge=SITE)
            again = await observer.of("NBIRTH")
            assert by_name(again)["bdSeq"]["value"] == by_name(nbirth)["bdSeq"]["value"]
            assert {(await observer.of("DBIRTH"))["device"] for _ in range(2)} == dbirths

            # a write is refused and counted
            await observer.send(
                op="dcmd", group=ENT, edge=SITE, device=PRESS_ID, name="raw/temperature", value=1.0
            )
            refused = await observer.of("DCMD")
            assert refused["device"] == PRESS_ID
            service = node.running
            assert isinstance(service, SparkplugNode)
            async with asyncio.timeout(10):
                while service.writes_refused < 1:
                    service.changed.clear()
                    await service.changed.wait()
            refusals = node.metrics.registry.get_sample_value(
                "uns_sparkplug_writes_refused_total",
                {"service": "sparkplug", "reason": "read_only"},
            )
            assert refusals == 1

            # a namespace device death: DDEATH
            await ns.publish(f"{ROBOT}/raw/death", DeviceDeath(ts=now_ms(), node="adapter",
                             device=ROBOT, bdseq=0, seq=2, reason="lost"))  # fmt: skip
            await observer.of("DDEATH", ROBOT_ID)
        # a clean stop says NDEATH (the will is not sent on a clean disconnect)
        death = await observer.of("NDEATH")
        assert by_name(death)["bdSeq"]["value"] == by_name(nbirth)["bdSeq"]["value"]
    check_host_rules(observer.messages())


async def test_a_killed_edge_node_dies_by_its_will(
    tmp_path: Path, broker: Any, observer: Peer
) -> None:
    """SIGKILL: the broker publishes the NDEATH will, with the bdSeq of the NBIRTH."""
    if not isinstance(broker, Mosquitto):
        pytest.skip("the will of a killed process: Mosquitto (amqtt also runs in this process)")
    config = tmp_path / "plant.yaml"
    config.write_text(
        f"namespace: {{enterprise: {ENT}, site: {SITE}}}\n"
        f"broker: {{url: {broker.url}}}\n"
        "services:\n  sparkplug: {enabled: true, metrics_port: 0}\n"
    )
    async with watching(broker.url, f"{ENT}/#") as ns:
        await ns.publish(f"{PRESS}/raw/birth", birth(PRESS, RAW_DEFS), retain=True)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "uns", "run", "sparkplug", "--config", str(config)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        nbirth = await observer.of("NBIRTH")
        await observer.of("DBIRTH", PRESS_ID)
        proc.send_signal(signal.SIGKILL)
        death = await observer.of("NDEATH")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert by_name(death)["bdSeq"]["value"] == by_name(nbirth)["bdSeq"]["value"]
    check_host_rules(observer.messages())


async def test_the_primary_host_state_gates_the_births(broker: Any, observer: Peer) -> None:
    """NBIRTH only once the primary host is online; its offline: NDEATH, disconnect, and
    start over with the next bdSeq once it is back."""
    async with watching(broker.url, f"{ENT}/#") as ns:
        await ns.publish(f"{PRESS}/raw/birth", birth(PRESS, RAW_DEFS), retain=True)
    await observer.send(op="state", host="scada", online=False, timestamp=1000)
    async with running(
        SparkplugNode, broker.url, ENT, site=SITE, enabled=True, primary_host_id="scada"
    ):
        await observer.send(op="state", host="scada", online=True, timestamp=2000)
        first = await observer.of("NBIRTH")
        states = [m for m in observer.lines[: observer.cursor] if m["type"] == "STATE"]
        assert [s["online"] for s in states] == [False, True], "NBIRTH before the host was online"
        await observer.of("DBIRTH", PRESS_ID)
        await observer.send(op="state", host="scada", online=False, timestamp=3000)
        death = await observer.of("NDEATH")
        assert by_name(death)["bdSeq"]["value"] == by_name(first)["bdSeq"]["value"]
        await observer.send(op="state", host="scada", online=False, timestamp=3500)
        await observer.send(op="state", host="scada", online=True, timestamp=4000)
        second = await observer.of("NBIRTH")
        states = [m for m in observer.lines[: observer.cursor] if m["type"] == "STATE"]
        assert states[-1]["online"] is True, "NBIRTH while the host was offline"
        assert by_name(second)["bdSeq"]["value"] == (by_name(first)["bdSeq"]["value"] + 1) % 256
        await observer.of("DBIRTH", PRESS_ID)
    check_host_rules(observer.messages())


async def test_a_write_to_a_writable_tag_goes_to_its_device_as_a_command(
    broker: Any, observer: Peer
) -> None:
    """Opted in per tag: within its range, a cmd/write to the device; out of it, or any other
    tag, refused and counted."""
    from uns import Command

    async with watching(broker.url, f"{ENT}/#") as ns:
        await ns.publish(f"{PRESS}/raw/birth", birth(PRESS, RAW_DEFS), retain=True)
        async with running(
            SparkplugNode, broker.url, ENT, site=SITE, enabled=True,
            writable=[f"{PRESS}/temperature"],
        ) as node:  # fmt: skip
            await observer.born({PRESS_ID: {"raw/temperature"}})
            dcmd = {"op": "dcmd", "group": ENT, "edge": SITE, "device": PRESS_ID}
            await observer.send(**dcmd, name="raw/temperature", value=150.0)  # high is 120
            await observer.send(**dcmd, name="raw/strokes", value=1, datatype="INT64")
            await observer.send(**dcmd, name="raw/temperature", value=80.0)
            write = await ns.next(f"{PRESS}/cmd/write", Command)
            assert (write.name, write.args) == ("write", {"metric": "temperature", "value": 80.0})
            registry = node.metrics.registry

            def refused(reason: str) -> float | None:
                return registry.get_sample_value(
                    "uns_sparkplug_writes_refused_total",
                    {"service": "sparkplug", "reason": reason},
                )

            assert (refused("out_of_range"), refused("read_only")) == (1, 1)


# ---- south -------------------------------------------------------------------------

PRESS7 = f"{ENT}/{SITE}/sparkplug/planta/line-1/press-7"
ARM = f"{ENT}/{SITE}/sparkplug/planta/line-1/arm-2"
EDGE_METRICS = [
    {"name": "temperature", "datatype": "DOUBLE", "value": 61.5},
    {"name": "speed", "datatype": "FLOAT", "value": 1.5},
    {"name": "running", "datatype": "BOOLEAN", "value": True},
    {"name": "count", "datatype": "INT32", "value": -5},
    {"name": "offset", "datatype": "INT8", "value": -3},
    {"name": "strokes", "datatype": "UINT64", "value": 2**40},
    {"name": "recipe", "datatype": "STRING", "value": "p7-250t"},
]


@pytest.fixture
async def edge_peer(broker: Any) -> AsyncIterator[Peer]:
    peer_python()
    async for peer in _peer("edge", str(broker.port), "PlantA", "Line 1"):
        yield peer


async def test_an_independent_edge_node_feeds_the_namespace(broker: Any, edge_peer: Peer) -> None:
    from uns_sparkplug.south import SparkplugAdapter

    async with (
        watching(broker.url, f"{ENT}/{SITE}/sparkplug/#") as ns,
        watching(broker.url, "spBv1.0/STATE/#") as states,
        running(
            SparkplugAdapter, broker.url, ENT, site=SITE, enabled=True, host_id="uns-pune",
            rebirth_request_interval_s=0,
        ) as node,
    ):  # fmt: skip
        state = await states.wait_for(lambda m: m.topic == "spBv1.0/STATE/uns-pune")
        assert json.loads(state.payload)["online"] is True
        await edge_peer.send(op="connect")
        # pysparkplug births its devices in paho's thread on connect, iterating them: a
        # device registered meanwhile raises there ("dictionary changed size") and no birth
        # goes out. Its subscription's answer comes after that callback.
        await edge_peer.of("SUBSCRIBED")
        await edge_peer.send(op="register", device="Press 7", metrics=EDGE_METRICS)
        await edge_peer.send(op="register", device="Arm 2", metrics=EDGE_METRICS[:1])

        birth = await ns.next(f"{PRESS7}/raw/birth", DeviceBirth)
        assert {d.name: d.datatype for d in birth.metrics} == {
            "temperature": "double", "speed": "float", "running": "bool", "count": "int32",
            "offset": "int8", "strokes": "uint64", "recipe": "string",
        }  # fmt: skip
        first = await ns.next(f"{PRESS7}/raw/data", DeviceData)
        assert {m.name: m.value for m in first.metrics} == {
            m["name"]: m["value"] for m in EDGE_METRICS
        }
        assert all(m.quality == "good" and m.ts for m in first.metrics)

        await edge_peer.send(
            op="update", device="Press 7",
            metrics=[{"name": "temperature", "datatype": "DOUBLE", "value": 62.0}],
        )  # fmt: skip
        update = await ns.next(f"{PRESS7}/raw/data", DeviceData)
        assert [(m.name, m.value) for m in update.metrics] == [("temperature", 62.0)]

        # a lost message: the adapter drops what follows, asks for a rebirth, and the
        # rebirth brings the current values
        await edge_peer.send(op="gap")
        await edge_peer.send(
            op="update", device="Press 7",
            metrics=[{"name": "temperature", "datatype": "DOUBLE", "value": 99.0}],
        )  # fmt: skip
        ncmd = await edge_peer.of("NCMD")
        assert ncmd["metrics"] == ["Node Control/Rebirth"]
        await ns.next(f"{PRESS7}/raw/birth", DeviceBirth)
        reborn = await ns.next(f"{PRESS7}/raw/data", DeviceData)  # the birth's values
        assert {m.name: m.value for m in reborn.metrics}["temperature"] == 99.0
        service = node.running
        assert isinstance(service, SparkplugAdapter)
        gaps = node.metrics.registry.get_sample_value(
            "uns_sparkplug_adapter_dropped_total",
            {"service": "sparkplug-adapter", "reason": "seq_gap"},
        )
        assert gaps == 1

        # a device death, then the edge node's (its will, bdSeq matching)
        await edge_peer.send(op="deregister", device="Press 7")
        death = await ns.next(f"{PRESS7}/raw/death", DeviceDeath)
        assert "DDEATH" in death.reason
        await edge_peer.kill()
        arm_death = await ns.next(f"{ARM}/raw/death", DeviceDeath)
        assert "NDEATH" in arm_death.reason
    offline = await states.wait_for(lambda m: m.topic == "spBv1.0/STATE/uns-pune")
    assert json.loads(offline.payload)["online"] is False


async def test_the_north_edge_node_read_back_by_the_south_adapter(broker: Any) -> None:
    """Our own two halves: aliases, units, ranges, quality survive the round trip (the
    south adapter puts the mirror in another site, so nothing loops)."""
    from uns_sparkplug.south import SparkplugAdapter

    back = f"{ENT}/mumbai/stamping/line-3/cell-a/press-01"
    async with watching(broker.url, f"{ENT}/#") as ns:
        await ns.publish(f"{PRESS}/raw/birth", birth(PRESS, RAW_DEFS), retain=True)
        async with (
            running(SparkplugAdapter, broker.url, ENT, site="mumbai", enabled=True),
            running(SparkplugNode, broker.url, ENT, site=SITE, enabled=True),
        ):
            mirrored = await ns.next(f"{back}/raw/birth", DeviceBirth)
            temp = {d.name: d for d in mirrored.metrics}["raw/temperature"]
            assert (temp.datatype, temp.unit, temp.low, temp.high) == ("double", "degC", 0, 120)
            assert "raw/vibration" not in {d.name for d in mirrored.metrics}
            t0 = now_ms() - 1000
            await ns.publish(
                f"{PRESS}/raw/data",
                data(
                    Metric(name="temperature", value=70.5, ts=t0),
                    Metric(name="strokes", value=-(2**40), ts=t0),
                    Metric(name="offset", value=7, ts=t0, quality="uncertain", reason="drift"),
                ),
            )
            values = await ns.wait_for(
                lambda m: m.topic == f"{back}/raw/data"
                and b"70.5" in m.payload
            )  # fmt: skip
    got = {m.name: m for m in __import__("uns").decode(values.payload, DeviceData).metrics}
    assert (got["raw/temperature"].value, got["raw/temperature"].ts) == (70.5, t0)
    assert got["raw/strokes"].value == -(2**40)
    assert (got["raw/offset"].quality, got["raw/offset"].reason) == ("uncertain", "drift")
