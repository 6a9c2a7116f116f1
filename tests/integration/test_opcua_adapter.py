"""The OPC UA adapter against a real asyncua server on a free loopback port.

Two servers live for the whole module (a plain one, and one that requires
Basic256Sha256 SignAndEncrypt plus a username); the restart test starts its own.
The adapter runs in-process on the in-memory broker; every wait is for an event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

from fixtures.logs import Records, capturing_logs
from fixtures.opcua import UaPlc, device_path, ua_server, variable
from fixtures.pki import OpcUaPki, opcua_pki
from fixtures.ports import free_port
from fixtures.proxy import Proxy
from uns import DeviceBirth, DeviceData, DeviceDeath, Waveform, decode
from uns.testing import Watcher, running, watching
from uns_opcua_adapter import OpcUaAdapter, Security, Tag, UaDevice, browse

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NS = "urn:uns:test:plc"
SERVER_URI = "urn:uns:test:plc-server"
CLIENT_URI = "urn:uns:test:opcua-adapter"
WAVE_LEN = 256
FAST = {
    "reconnect_min_s": 0.05,
    "reconnect_max_s": 0.5,
    "watchdog_s": 0.5,
    "timeout_s": 2.0,
    "keepalive_failures": 2,
}
SILENT_DEATH_S = FAST["keepalive_failures"] * (FAST["watchdog_s"] + FAST["timeout_s"])
"""A silent link is declared lost after this many seconds (keep-alive reads unanswered)."""


# ---- the PLC ------------------------------------------------------------------------------------


class Users(UserManager):
    def get_user(
        self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None
    ) -> Any:
        if username == "edge" and password == "s3cret":
            return User(role=UserRole.User, name=username)
        return None


async def start_plc(port: int, pki: OpcUaPki | None = None) -> UaPlc:
    server, url, _ = await ua_server(
        port,
        name="uns test PLC",
        pki=pki,
        application_uri=SERVER_URI,
        users=Users() if pki else None,
        logins=pki is not None,
    )
    ns = await server.register_namespace(NS)
    plant = await server.nodes.objects.add_folder(
        ua.NodeId("Plant", ns), ua.QualifiedName("Plant", ns)
    )
    press = await plant.add_object(ua.NodeId("Press01", ns), ua.QualifiedName("Press01", ns))

    async def var(name: str, value: Any, vt: ua.VariantType) -> Any:
        return await variable(press, ns, f"Press01.{name}", value, vt)

    nodes = {
        "temp": await var("BearingTemp", 20.0, ua.VariantType.Double),
        "running": await var("Running", False, ua.VariantType.Boolean),
        "count": await var("StrokeCount", 0, ua.VariantType.UInt32),
        "pressure": await var("Pressure", 0.0, ua.VariantType.Double),
        "wave": await var("Vibration", [0.0] * WAVE_LEN, ua.VariantType.Float),
    }
    await nodes["wave"].write_value_rank(ua.ValueRank.OneDimension)
    await nodes["temp"].add_property(
        ua.NodeId("Press01.BearingTemp.EngineeringUnits", ns),
        ua.QualifiedName("EngineeringUnits", 0),
        ua.EUInformation(
            NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
            UnitId=4408652,
            DisplayName=ua.LocalizedText("°C"),
            Description=ua.LocalizedText("degree Celsius"),
        ),
    )
    await nodes["temp"].add_property(
        ua.NodeId("Press01.BearingTemp.EURange", ns),
        ua.QualifiedName("EURange", 0),
        ua.Range(Low=0.0, High=150.0),
    )
    await server.start()
    return UaPlc(server, url, port, nodes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> OpcUaPki:
    """The PLC's certificate and the adapter's, which the PLC trusts."""
    d = tmp_path_factory.mktemp("opcua-pki")
    pki = opcua_pki(d, server_uri=SERVER_URI, client_uri=CLIENT_URI)
    (d / "trusted").mkdir()
    (d / "trusted" / "adapter.der").write_bytes(pki.client_cert.read_bytes())
    return pki


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc() -> AsyncIterator[UaPlc]:
    server = await start_plc(free_port())
    yield server
    await server.server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_plc(pki: OpcUaPki) -> AsyncIterator[UaPlc]:
    server = await start_plc(free_port(), pki)
    yield server
    await server.server.stop()


@pytest.fixture
def logs() -> Iterator[Records]:
    with capturing_logs("uns_opcua_adapter", timeout=10.0) as handler:
        yield handler


# ---- helpers ------------------------------------------------------------------------------------


def press_template() -> dict[str, list[Tag]]:
    return {
        "press": [
            Tag(name="bearing_temp", node="{prefix}.BearingTemp", datatype="double", unit="degC"),
            Tag(name="running", node="/Objects/2:Plant/2:Press01/2:Running", datatype="bool"),
            Tag(name="stroke_count", node="{prefix}.StrokeCount", datatype="uint32", unit="1"),
        ]
    }


def press(prefix: str, *tags: Tag) -> UaDevice:
    return UaDevice(
        path=device_path(prefix), template="press", prefix="ns=2;s=Press01", tags=list(tags)
    )


async def next_data(w: Watcher, prefix: str, predicate: Any, timeout: float = 5.0) -> DeviceData:
    """The next data message of the device whose metrics satisfy ``predicate``."""
    topic = f"{device_path(prefix)}/raw/data"

    def match(m: Any) -> bool:
        if m.topic != topic:
            return False
        data = decode(m.payload)
        return isinstance(data, DeviceData) and bool(predicate(data))

    message = await w.wait_for(match, timeout)
    result: DeviceData = decode(message.payload)
    return result


def metric(data: DeviceData, name: str) -> Any:
    return next(m for m in data.metrics if m.name == name)


def has(name: str, value: Any = ..., **fields: Any) -> Any:
    def check(data: DeviceData) -> bool:
        return any(
            m.name == name
            and (value is ... or m.value == value)
            and all(getattr(m, k) == v for k, v in fields.items())
            for m in data.metrics
        )

    return check


# ---- the tests ----------------------------------------------------------------------------------


async def test_every_tag_arrives_with_its_unit_in_the_birth_and_the_servers_source_timestamp(
    plc: UaPlc, memory_url: str, prefix: str
) -> None:
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[press(prefix)],
            templates=press_template(),
            **FAST,
        ) as node,
    ):
        birth: DeviceBirth = await w.wait_topic("/dev-1/raw/birth")
        defs = {m.name: m for m in birth.metrics}
        assert list(defs) == ["bearing_temp", "running", "stroke_count"]
        assert (defs["bearing_temp"].unit, defs["bearing_temp"].datatype) == ("degC", "double")
        assert defs["bearing_temp"].source == "opcua:ns=2;s=Press01.BearingTemp"
        assert defs["running"].source == "opcua:ns=2;s=Press01.Running"  # browse path resolved
        await next_data(w, prefix, lambda d: {m.name for m in d.metrics} >= set(defs))

        ts = dt.datetime.now(dt.UTC).replace(microsecond=123_000) - dt.timedelta(seconds=3)
        await plc.write("temp", 71.5, ua.VariantType.Double, ts=ts)
        await plc.write("running", True, ua.VariantType.Boolean, ts=ts)
        await plc.write("count", 42, ua.VariantType.UInt32, ts=ts)
        ts_ms = int(ts.timestamp() * 1000)
        seen: dict[str, Any] = {}
        while len(seen) < 3:
            data = await next_data(w, prefix, lambda d: any(m.ts == ts_ms for m in d.metrics))
            seen.update({m.name: m for m in data.metrics if m.ts == ts_ms})
        assert {n: (m.value, m.quality) for n, m in seen.items()} == {
            "bearing_temp": (71.5, "good"),
            "running": (True, "good"),
            "stroke_count": (42, "good"),
        }
        latencies = node.metrics.registry.get_sample_value(
            "uns_opcua_publish_latency_seconds_count", {"service": "opcua-adapter"}
        )
        assert latencies is not None and latencies >= 6


async def test_a_bad_status_from_the_server_arrives_as_quality_bad_with_its_name(
    plc: UaPlc, memory_url: str, prefix: str
) -> None:
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[press(prefix)],
            templates=press_template(),
            **FAST,
        ),
    ):
        await next_data(w, prefix, has("bearing_temp"))
        await plc.write(
            "temp", 80.0, ua.VariantType.Double, status=ua.StatusCodes.BadCommunicationError
        )
        data = await next_data(w, prefix, has("bearing_temp", quality="bad"))
        m = metric(data, "bearing_temp")
        assert (m.quality, m.reason, m.value) == ("bad", "BadCommunicationError", None)
        await plc.write(
            "temp", 81.0, ua.VariantType.Double, status=ua.StatusCodes.UncertainLastUsableValue
        )
        data = await next_data(w, prefix, has("bearing_temp", 81.0))
        m = metric(data, "bearing_temp")
        assert (m.quality, m.reason) == ("uncertain", "UncertainLastUsableValue")
        await plc.write("temp", 82.0, ua.VariantType.Double)
        data = await next_data(w, prefix, has("bearing_temp", 82.0))
        assert (metric(data, "bearing_temp").quality, metric(data, "bearing_temp").reason) == (
            "good",
            None,
        )


async def test_a_node_that_does_not_exist_is_published_bad_and_the_other_tags_keep_flowing(
    plc: UaPlc, memory_url: str, prefix: str, logs: Records
) -> None:
    missing = Tag(name="oil_level", node="ns=2;s=Press01.OilLevel", unit="%")
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[press(prefix, missing)],
            templates=press_template(),
            **FAST,
        ) as node,
    ):
        data = await next_data(w, prefix, has("oil_level"))
        m = metric(data, "oil_level")
        assert (m.quality, m.reason) == ("bad", "BadNodeIdUnknown")
        await plc.write("count", 7, ua.VariantType.UInt32)
        await next_data(w, prefix, has("stroke_count", 7, quality="good"))
        errors = logs.of("uns_opcua_adapter", logging.ERROR)
        assert len(errors) == 1
        line = errors[0].getMessage()
        assert device_path(prefix) in line and "'oil_level'" in line and "BadNodeIdUnknown" in line
        assert errors[0].exc_info is None
        assert (
            node.metrics.registry.get_sample_value(
                "uns_opcua_session_up", {"service": "opcua-adapter"}
            )
            == 1.0
        )


async def test_changes_within_one_publishing_cycle_arrive_together_and_none_is_lost(
    plc: UaPlc, memory_url: str, prefix: str
) -> None:
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[press(prefix)],
            templates=press_template(),
            publishing_interval_ms=400,
            **FAST,
        ) as node,
    ):
        await next_data(w, prefix, has("bearing_temp"))
        base = dt.datetime.now(dt.UTC).replace(microsecond=0)
        for i in range(5):  # far faster than one publishing cycle
            await plc.write(
                "temp", 30.0 + i, ua.VariantType.Double, ts=base + dt.timedelta(milliseconds=i)
            )
        await plc.write("count", 1000, ua.VariantType.UInt32, ts=base)
        temps: list[float] = []
        messages = 0
        while len(temps) < 5:
            data = await next_data(
                w,
                prefix,
                lambda d: any(m.value in (30.0, 31.0, 32.0, 33.0, 34.0, 1000) for m in d.metrics),
            )
            messages += 1
            temps += [m.value for m in data.metrics if m.name == "bearing_temp"]
        assert temps == [30.0, 31.0, 32.0, 33.0, 34.0]  # every change, in order, each its own ts
        assert messages <= 2  # one message per device per cycle (two if a cycle ended mid-write)
        notifications = node.metrics.registry.get_sample_value(
            "uns_opcua_notifications_total", {"service": "opcua-adapter"}
        )
        assert notifications is not None and notifications >= 6


async def test_an_absolute_deadband_lets_the_server_drop_small_changes(
    plc: UaPlc, memory_url: str, prefix: str
) -> None:
    tag = Tag(name="pressure", node="ns=2;s=Press01.Pressure", unit="bar", deadband=0.5)
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[tag])],
            **FAST,
        ),
    ):
        await next_data(w, prefix, has("pressure"))
        for value in (100.0, 100.2, 100.4, 101.0):
            await plc.write("pressure", value, ua.VariantType.Double)
            await asyncio.sleep(0)  # let the server evaluate each change
        values: list[float] = []
        while 101.0 not in values:
            data = await next_data(w, prefix, has("pressure"))
            values += [m.value for m in data.metrics if m.value in (100.0, 100.2, 100.4, 101.0)]
        assert values == [100.0, 101.0]


async def test_a_float_array_written_20_times_arrives_as_20_complete_waveform_blocks_in_order(
    plc: UaPlc, memory_url: str, prefix: str
) -> None:
    tag = Tag(
        name="vibration",
        node="ns=2;s=Press01.Vibration",
        datatype="waveform",
        unit="g",
        rate_hz=10_000.0,
        sampling_ms=0,
    )
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[tag])],
            **FAST,
        ),
    ):
        birth: DeviceBirth = await w.wait_topic("/dev-1/raw/birth")
        assert (birth.metrics[0].datatype, birth.metrics[0].rate_hz) == ("waveform", 10_000.0)
        first = metric(await next_data(w, prefix, has("vibration")), "vibration").value
        assert isinstance(first, Waveform)
        base = dt.datetime.now(dt.UTC).replace(microsecond=0)
        written = []
        for i in range(20):
            values = [float(i * 1000 + k) for k in range(WAVE_LEN)]
            ts = await plc.write(
                "wave", values, ua.VariantType.Float, ts=base + dt.timedelta(milliseconds=i)
            )
            written.append((values, int(ts.timestamp() * 1_000_000)))
        blocks: list[Waveform] = []
        while len(blocks) < 20:
            data = await next_data(w, prefix, has("vibration"))
            assert len(data.metrics) == 1  # one message per block
            blocks.append(data.metrics[0].value)
        # numbered in a row (the first, the value it had, may be any number of blocks older)
        assert [b.block for b in blocks] == list(range(blocks[0].block, blocks[0].block + 20))
        assert blocks[0].block > first.block
        assert [(b.values(), b.t0_us) for b in blocks] == written
        assert all(b.rate_hz == 10_000.0 and b.dtype == "f32" for b in blocks)


async def test_a_server_restart_gives_death_then_birth_then_data_without_a_crash(
    memory_url: str, prefix: str, logs: Records
) -> None:
    port = free_port()
    server = await start_plc(port)
    try:
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                url=server.url,
                devices=[press(prefix)],
                templates=press_template(),
                **FAST,
            ) as node,
        ):
            await w.wait_topic("/dev-1/raw/birth")
            await next_data(w, prefix, has("bearing_temp"))
            await server.server.stop()
            death: DeviceDeath = await w.wait_topic("/dev-1/raw/death")
            assert isinstance(death, DeviceDeath) and death.reason.startswith("opcua:")
            server = await start_plc(port)
            await w.wait_topic("/dev-1/raw/birth")
            await server.write("temp", 55.5, ua.VariantType.Double)
            await next_data(w, prefix, has("bearing_temp", 55.5))
            order = [m.topic.rsplit("/", 1)[-1] for m in w.seen if m.payload and "/raw/" in m.topic]
            last_death = len(order) - 1 - order[::-1].index("death")
            assert order[last_death + 1 :][:2] == ["birth", "data"]
            assert (
                node.metrics.registry.get_sample_value(
                    "uns_opcua_errors_total", {"service": "opcua-adapter", "reason": "lost"}
                )
                == 1.0
            )
    finally:
        await server.server.stop()
    client_side = [r for r in logs.records if not r.name.startswith("asyncua.server")]
    assert not [r for r in client_side if r.exc_info], "no tracebacks on a server restart"
    assert any("lost OPC UA server" in r.getMessage() for r in logs.of("uns_opcua_adapter"))


async def test_a_silent_network_gives_death_within_seconds_then_birth_and_data_when_it_returns(
    plc: UaPlc, memory_url: str, prefix: str, logs: Records
) -> None:
    cable = await Proxy(plc.port).start()  # a cable to the PLC, pulled and plugged
    try:
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                url=f"opc.tcp://127.0.0.1:{cable.port}/uns/",
                devices=[press(prefix)],
                templates=press_template(),
                **FAST,
            ),
        ):
            await next_data(w, prefix, has("bearing_temp"))
            cable.silence()
            pulled = asyncio.get_running_loop().time()
            death: DeviceDeath = await w.wait_topic("/dev-1/raw/death")
            assert asyncio.get_running_loop().time() - pulled < SILENT_DEATH_S + 2
            assert isinstance(death, DeviceDeath)
            cable.restore()
            await w.wait_topic("/dev-1/raw/birth")
            await plc.write("count", 4242, ua.VariantType.UInt32)
            await next_data(w, prefix, has("stroke_count", 4242))
    finally:
        await cable.close()
    client_side = [r for r in logs.records if not r.name.startswith("asyncua.server")]
    assert not [r for r in client_side if r.exc_info], "no tracebacks on a network loss"


async def test_sign_and_encrypt_with_a_client_certificate_and_a_username_delivers_data(
    secure_plc: UaPlc, pki: OpcUaPki, memory_url: str, prefix: str
) -> None:
    security = Security(
        mode="sign_encrypt",
        certificate=str(pki.client_cert),
        private_key=str(pki.client_key),
        server_certificate=str(pki.server_cert),
    )
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=secure_plc.url,
            security=security,
            username="edge",
            password="s3cret",
            devices=[press(prefix)],
            templates=press_template(),
            **FAST,
        ),
    ):
        await w.wait_topic("/dev-1/raw/birth")
        await secure_plc.write("temp", 64.25, ua.VariantType.Double)
        await next_data(w, prefix, has("bearing_temp", 64.25, quality="good"))


async def test_a_wrong_password_from_the_password_file_is_refused_with_one_clear_line_per_try(
    secure_plc: UaPlc, pki: OpcUaPki, memory_url: str, prefix: str, logs: Records, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    security = Security(
        mode="sign_encrypt", certificate=str(pki.client_cert), private_key=str(pki.client_key)
    )
    async with running(
        OpcUaAdapter,
        memory_url,
        prefix,
        url=secure_plc.url,
        security=security,
        username="edge",
        password_file=str(secret),
        devices=[press(prefix)],
        templates=press_template(),
        login_retry_min_s=0.05,  # the default (60 s) is test_opcua_realpeer's subject
        **FAST,
    ) as node:
        await logs.wait(lambda: len(logs.of("uns_opcua_adapter")) >= 2)
        rejected = node.metrics.registry.get_sample_value(
            "uns_opcua_errors_total", {"service": "opcua-adapter", "reason": "rejected"}
        )
    lines = logs.of("uns_opcua_adapter")
    assert rejected is not None and len(lines) == int(rejected) >= 2
    assert all(
        "BadUserAccessDenied" in r.getMessage() and "check username and password" in r.getMessage()
        for r in lines
    )
    client_side = [
        r for r in logs.records if not r.name.startswith(("asyncua.server", "asyncuagds"))
    ]
    assert not [r for r in client_side if r.exc_info]
    assert not [
        r for r in client_side if r.name.startswith("asyncua") and r.levelno >= logging.WARNING
    ]


async def test_a_server_that_requires_sign_and_encrypt_refuses_an_adapter_without_certificates(
    secure_plc: UaPlc, memory_url: str, prefix: str, logs: Records
) -> None:
    async with running(
        OpcUaAdapter,
        memory_url,
        prefix,
        url=secure_plc.url,
        username="edge",
        password="s3cret",
        devices=[press(prefix)],
        templates=press_template(),
        **FAST,
    ):
        await logs.wait(lambda: logs.of("uns_opcua_adapter"))
    assert "No matching endpoints" in logs.of("uns_opcua_adapter")[0].getMessage()


async def test_browse_returns_a_starter_config_naming_the_servers_variables_with_their_node_ids(
    plc: UaPlc,
) -> None:
    text = await browse(plc.url)
    section = msgspec.yaml.decode(text)["services"]["opcua-adapter"]
    assert section["url"] == plc.url
    [device] = section["devices"]
    assert device["path"] == "acme/pune/area/line/cell/press01"
    tags = {t["name"]: t for t in device["tags"]}
    assert tags["bearing_temp"] == {
        "name": "bearing_temp",
        "node": f"nsu={NS};s=Press01.BearingTemp",  # the URI: its index changes on a rebuild
        "datatype": "double",
        "unit": "degC",
        "low": 0.0,
        "high": 150.0,
    }
    assert {n: (t["node"], t["datatype"]) for n, t in tags.items() if n != "bearing_temp"} == {
        "running": (f"nsu={NS};s=Press01.Running", "bool"),
        "stroke_count": (f"nsu={NS};s=Press01.StrokeCount", "uint32"),
        "pressure": (f"nsu={NS};s=Press01.Pressure", "double"),
        "vibration": (f"nsu={NS};s=Press01.Vibration", "waveform"),
    }
    assert tags["vibration"]["rate_hz"] == 1000  # a placeholder the config accepts ...
    assert "rate_hz is a placeholder" in text  # ... and says so
