"""The OPC UA adapter against servers that behave like real PLCs, not like a friendly test.

Every server here is a real asyncua server on a free loopback port, configured the way
the plants we met were: Basic256Sha256 with a trust list that does not (yet) hold our
certificate and that checks it at OpenSecureChannel (as node-opcua and S7-1500 do;
asyncua itself checks only at CreateSession), a user manager that refuses the login,
namespace indexes that move when the project is rebuilt, a link that answers slowly,
a waveform written faster than the publishing interval. Each test fails on the adapter
as it was before issue 15 (items 8-11, 13) and says so in its docstring.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509

from fixtures.logs import Records, capturing_logs
from fixtures.opcua import UaPlc, adapter_lines, device_path, ua_server, variable
from fixtures.pki import OpcUaPki, opcua_certificate, opcua_pki
from fixtures.ports import free_port
from uns import DeviceBirth, DeviceData, Waveform, decode
from uns.config import load
from uns.testing import Watcher, running, watching
from uns_opcua_adapter import (
    BrowseError,
    OpcUaAdapter,
    OpcUaAdapterSettings,
    Security,
    Tag,
    UaDevice,
    browse,
)
from uns_opcua_adapter.ua import Credentials, Monitor, UaSession

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NS = "urn:uns:test:realpeer"
SERVER_URI = "urn:uns:test:realpeer-plc"
CLIENT_URI = "urn:uns:test:realpeer-adapter"
WAVE_LEN = 256
RATE_HZ = 10_240.0
BLOCK_US = int(WAVE_LEN * 1e6 / RATE_HZ)  # 25 ms of signal per block, back to back
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "timeout_s": 2.0}


# ---- the PLC ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki(OpcUaPki):
    other_cert: Path = Path()
    """A certificate that is neither the server's nor ours (to pin wrongly)."""


class Users(UserManager):
    """Counts every login; lets ``edge``/``s3cret`` in unless ``refuse``."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.tries: list[str | None] = []

    def get_user(
        self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None
    ) -> Any:
        self.tries.append(username)
        if not self.refuse and username == "edge" and password == "s3cret":
            return User(role=UserRole.User, name=username)
        return None


@dataclass
class Plc(UaPlc):
    users: Users | None = None

    async def trust(self, cert: Path) -> None:
        """The operator trusts a certificate on the PLC (its trusted list reloads)."""
        assert self.store is not None
        target = self.store.trust_locations[0] / cert.name
        await asyncio.to_thread(target.write_bytes, await asyncio.to_thread(cert.read_bytes))
        await self.store.load()

    async def stop(self) -> None:
        OPEN_GATES.pop(id(self.server.iserver), None)
        await self.server.stop()


Refusal = str
"""How a server refuses an untrusted certificate at OpenSecureChannel: "response" (an
OpenSecureChannelResponse with BadCertificateUntrusted) or "fault" (a ServiceFault with
BadSecurityChecksFailed, as node-opcua answers)."""
OPEN_GATES: dict[int, tuple[TrustStore, Refusal]] = {}
"""Servers that check the client certificate at OpenSecureChannel (id of the iserver)."""


async def start_plc(
    port: int,
    *,
    pki: Pki | None = None,
    check_at_open: Refusal | None = None,
    users: Users | None = None,
    namespaces_before: int = 0,
) -> Plc:
    """A PLC: ``pki`` makes it Basic256Sha256 SignAndEncrypt only, with a trust list holding
    one certificate that is not ours; ``namespaces_before`` registers namespaces before ours
    (a rebuilt project: the same URI, another index)."""
    trusted = None
    if pki is not None:
        trusted = pki.dir / f"trusted-{port}"
        trusted.mkdir()
        (trusted / "someone-else.der").write_bytes(pki.other_cert.read_bytes())
    server, url, store = await ua_server(
        port,
        name="uns realpeer PLC",
        pki=pki,
        application_uri=SERVER_URI,
        trusted=trusted,
        users=users,
        logins=users is not None,
    )
    if store is not None and check_at_open:
        OPEN_GATES[id(server.iserver)] = (store, check_at_open)
    for i in range(namespaces_before):
        await server.register_namespace(f"urn:uns:test:other-{i}")
    ns = await server.register_namespace(NS)
    press = await server.nodes.objects.add_object(
        ua.NodeId("Press01", ns), ua.QualifiedName("Press01", ns)
    )

    async def var(name: str, value: Any, vt: ua.VariantType) -> Any:
        return await variable(press, ns, f"Press01.{name}", value, vt)

    nodes = {
        "temp": await var("BearingTemp", 20.0, ua.VariantType.Double),
        "wave": await var("Vibration", [0.0] * WAVE_LEN, ua.VariantType.Float),
    }
    await nodes["wave"].write_value_rank(ua.ValueRank.OneDimension)
    await server.start()
    return Plc(server, url, port, nodes, ns, store, users)


async def restart_plc(port: int, **kwargs: Any) -> Plc:
    """`start_plc` on a port a client keeps dialling: a dial to a loopback port with no
    listener can connect to itself (TCP simultaneous open) and hold the port a moment."""
    for _ in range(50):
        try:
            return await start_plc(port, **kwargs)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"port {port} stayed in use")


@pytest.fixture(autouse=True, scope="module")
def plcs_check_certificates_at_open() -> Iterator[None]:
    """asyncua's server checks a client certificate at CreateSession; PLCs (and node-opcua)
    check it at OpenSecureChannel and answer with a bad ServiceResult (in an
    OpenSecureChannelResponse, or in a ServiceFault as node-opcua does). This makes the
    servers in ``OPEN_GATES`` do what a PLC does."""
    original = UaProcessor.open_secure_channel

    def open_secure_channel(self: UaProcessor, algohdr: Any, seqhdr: Any, body: Any) -> None:
        store, refusal = OPEN_GATES.get(id(self.iserver), (None, ""))
        sender = algohdr.SenderCertificate
        if (
            store is not None
            and not self._connection.is_open()
            and sender
            and not store.is_trusted(x509.load_der_x509_certificate(sender))
        ):
            request = struct_from_binary(ua.OpenSecureChannelRequest, body.copy())
            self._connection.select_policy(
                algohdr.SecurityPolicyURI, sender, request.Parameters.SecurityMode
            )
            response: Any = ua.OpenSecureChannelResponse()
            response.ResponseHeader.ServiceResult = ua.StatusCode(
                ua.StatusCodes.BadCertificateUntrusted
            )
            if refusal == "fault":
                response = ua.ServiceFault()
                response.ResponseHeader.ServiceResult = ua.StatusCode(
                    ua.StatusCodes.BadSecurityChecksFailed
                )
            self.send_response(
                request.RequestHeader.RequestHandle, seqhdr, response, ua.MessageType.SecureOpen
            )
            return
        original(self, algohdr, seqhdr, body)

    UaProcessor.open_secure_channel = open_secure_channel  # type: ignore[method-assign]
    yield
    UaProcessor.open_secure_channel = original  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates as `uns opcua cert` makes them (the command's code, not a test copy)."""
    d = tmp_path_factory.mktemp("opcua-realpeer-pki")
    ours = opcua_pki(d, server_uri=SERVER_URI, client_uri=CLIENT_URI)
    other, _ = opcua_certificate(d, "other", "urn:uns:test:other", server=True)
    return Pki(
        d, ours.server_cert, ours.server_key, ours.client_cert, ours.client_key, other_cert=other
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc() -> AsyncIterator[Plc]:
    server = await start_plc(free_port())
    yield server
    await server.stop()


@pytest.fixture
def logs() -> Iterator[Records]:
    with capturing_logs("uns_opcua_adapter", timeout=20.0) as handler:
        yield handler


def tracebacks(logs: Records) -> list[logging.LogRecord]:
    """Records with a traceback from our side (the test servers' own are not ours)."""
    return [
        r
        for r in logs.records
        if r.exc_info and not r.name.startswith(("asyncua.server", "asyncuagds"))
    ]


def counter(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, {"service": "opcua-adapter", **labels})
    return 0.0 if value is None else float(value)


async def next_data(w: Watcher, prefix: str, predicate: Any, timeout: float = 10.0) -> DeviceData:
    topic = f"{device_path(prefix)}/raw/data"

    def match(m: Any) -> bool:
        if m.topic != topic or not m.payload:
            return False
        data = decode(m.payload)
        return isinstance(data, DeviceData) and bool(predicate(data))

    message = await w.wait_for(match, timeout)
    result: DeviceData = decode(message.payload)
    return result


def has(name: str, value: Any = ...) -> Any:
    return lambda d: any(m.name == name and (value is ... or m.value == value) for m in d.metrics)


def secure(pki: Pki, **fields: Any) -> Security:
    return Security(
        mode="sign_encrypt",
        certificate=str(pki.client_cert),
        private_key=str(pki.client_key),
        **fields,
    )


TEMP = Tag(name="bearing_temp", node=f"nsu={NS};s=Press01.BearingTemp", unit="degC")


def vibration(plc: Plc, **fields: Any) -> Tag:
    return Tag(
        name="vibration",
        node=f"ns={plc.ns};s=Press01.Vibration",
        datatype="waveform",
        unit="g",
        rate_hz=RATE_HZ,
        **fields,
    )


# ---- item 8: an untrusted client certificate ----------------------------------------------------


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("response", "BadCertificateUntrusted"),
        ("fault", "BadSecurityChecksFailed"),
        (None, "BadCertificateUntrusted"),
    ],
    ids=["at-open-in-a-response", "at-open-in-a-fault", "at-create-session"],
)
async def test_an_untrusted_certificate_is_one_clear_line_per_slow_retry_then_trusting_it_connects(
    pki: Pki, memory_url: str, prefix: str, logs: Records, where: str | None, code: str
) -> None:
    """Before: at OpenSecureChannel asyncua raised AssertionError and the adapter exited 1
    with a traceback (a restart loop under `uns up`); at CreateSession it logged
    "refused the secure channel" every 0.25-5 s and never said which file to trust."""
    server = await start_plc(free_port(), pki=pki, check_at_open=where)
    try:
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                url=server.url,
                security=secure(pki),
                devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
                certificate_retry_s=1.0,
                **FAST,
            ) as node,
        ):
            await logs.wait(
                lambda: any("rejected our certificate" in m for m in adapter_lines(logs))
            )
            [line] = adapter_lines(logs)
            assert f"rejected our certificate ({code})" in line
            assert f"trust {pki.client_cert} on the server" in line
            assert "next try in 1 s" in line
            await server.trust(pki.client_cert)  # what the README tells the operator to do
            await w.wait_topic("/dev-1/raw/birth", timeout=20.0)
            await server.write("temp", 71.5, ua.VariantType.Double)
            await next_data(w, prefix, has("bearing_temp", 71.5))
            assert counter(node, "uns_opcua_errors_total", reason="rejected") >= 1
    finally:
        await server.stop()
    assert not tracebacks(logs)


async def test_an_untrusted_certificate_is_retried_once_a_minute_by_default(
    pki: Pki, memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: retried at the reconnect pace (0.25 s doubling to 5 s), each try one more
    rejected certificate and error line on the PLC."""
    server = await start_plc(free_port(), pki=pki, check_at_open="response")
    try:
        async with running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=server.url,
            security=secure(pki),
            devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
            **FAST,
        ) as node:
            await logs.wait(lambda: adapter_lines(logs))
            await asyncio.sleep(3.0)  # the old pace would have tried 6 more times by now
            assert counter(node, "uns_opcua_errors_total", reason="rejected") == 1
    finally:
        await server.stop()
    [line] = adapter_lines(logs)
    assert "rejected our certificate" in line and "next try in 60 s" in line


async def test_browse_against_a_server_that_does_not_trust_us_says_so_instead_of_crashing(
    pki: Pki,
) -> None:
    """Before: `uns opcua browse` died with an AssertionError from asyncua."""
    server = await start_plc(free_port(), pki=pki, check_at_open="response")
    try:
        with pytest.raises(BrowseError) as err:
            await browse(server.url, security=secure(pki), timeout_s=3.0)
    finally:
        await server.stop()
    assert "rejected our certificate (BadCertificateUntrusted)" in str(err.value)
    assert str(pki.client_cert) in str(err.value)


async def test_a_wrongly_pinned_server_certificate_is_named_as_such(
    pki: Pki, memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: the server could not decrypt our request (BadTcpInternalError), with asyncua
    warnings on every retry and no word about the pin."""
    server = await start_plc(free_port(), pki=pki)
    await server.trust(pki.client_cert)
    try:
        async with running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=server.url,
            security=secure(pki, server_certificate=str(pki.other_cert)),
            devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
            **FAST,
        ):
            await logs.wait(lambda: adapter_lines(logs))
    finally:
        await server.stop()
    [line] = adapter_lines(logs)
    assert "not the one pinned in security.server_certificate" in line
    assert str(pki.other_cert) in line
    assert not [r for r in logs.records if r.name.startswith("asyncua.client")]
    assert not tracebacks(logs)


# ---- item 13: a refused login -------------------------------------------------------------------


async def test_a_refused_login_waits_a_minute_before_the_next_try_and_says_why(
    memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: the refused login was retried every 0.25-5 s forever, which locks the
    account on many PLCs."""
    users = Users(refuse=True)
    server = await start_plc(free_port(), users=users)
    try:
        async with running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=server.url,
            username="edge",
            password="wrong",
            devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
            **FAST,
        ):
            await logs.wait(lambda: adapter_lines(logs))
            await asyncio.sleep(3.0)  # the old pace would have tried 6 more times by now
            tries = list(users.tries)
    finally:
        await server.stop()
    assert tries == ["edge"]
    [line] = adapter_lines(logs)
    assert "login refused for user 'edge': BadUserAccessDenied" in line
    assert "next try in 60 s so the PLC does not lock the account" in line


async def test_refused_logins_back_off_doubling_and_a_good_login_resets_it(
    memory_url: str, prefix: str, logs: Records
) -> None:
    users = Users(refuse=True)
    server = await start_plc(free_port(), users=users)
    try:
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                url=server.url,
                username="edge",
                password="s3cret",
                devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
                login_retry_min_s=0.2,
                login_retry_max_s=0.4,
                **FAST,
            ),
        ):
            await logs.wait(lambda: len(adapter_lines(logs)) >= 3)
            users.refuse = False  # the account is fixed on the PLC
            await w.wait_topic("/dev-1/raw/birth")
    finally:
        await server.stop()
    waits = [m.split("next try in ")[1].split(" s")[0] for m in adapter_lines(logs)[:3]]
    assert waits == ["0.2", "0.4", "0.4"]


# ---- item 9: a slow server is not a dead one ----------------------------------------------------


class SlowLink:
    """A TCP proxy whose answers (server to client) arrive ``delay`` seconds late."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delay = 0.0
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def upstream() -> None:
            while data := await cr.read(65536):
                sw.write(data)

        async def downstream() -> None:
            while data := await sr.read(65536):
                late.put_nowait((loop.time() + self.delay, data))
            late.put_nowait((0.0, b""))

        async def deliver() -> None:
            while True:
                due, data = await late.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                cw.write(data)
            cw.close()

        for coro in (upstream(), downstream(), deliver()):
            task = asyncio.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        await self.server.wait_closed()


async def test_a_server_answering_two_and_a_half_seconds_late_keeps_its_session(
    plc: Plc, memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: with the default watchdog_s (1 s) the keep-alive read timed out after 1 s,
    the session was dropped and every device's death and birth republished."""
    link = SlowLink(plc.port)
    await link.start()
    try:
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(
                OpcUaAdapter,
                memory_url,
                prefix,
                url=f"opc.tcp://127.0.0.1:{link.port}/uns/",
                devices=[UaDevice(path=device_path(prefix), tags=[TEMP])],
                reconnect_min_s=0.05,
                reconnect_max_s=0.5,  # defaults otherwise: watchdog_s 1, timeout_s 5
            ) as node,
        ):
            await w.wait_topic("/dev-1/raw/birth")
            link.delay = 2.5  # a PLC busy with its cycle; nothing is lost, all is late
            for i in range(6):  # about 8 s of slow answers: several keep-alive reads
                await plc.write("temp", 80.0 + i, ua.VariantType.Double)
                await next_data(w, prefix, has("bearing_temp", 80.0 + i), timeout=15.0)
            assert counter(node, "uns_opcua_errors_total", reason="lost") == 0
    finally:
        await link.close()
    topics = [m.topic.rsplit("/", 1)[-1] for m in w.seen if "/raw/" in m.topic and m.payload]
    assert "death" not in topics and topics.count("birth") == 1
    assert not tracebacks(logs)


# ---- item 10: waveform blocks -------------------------------------------------------------------


def block_values(k: int) -> list[float]:
    """Block ``k`` of the stream: its first sample is k * 1000, so a test knows which it is."""
    return [float(k * 1000 + i) for i in range(WAVE_LEN)]


async def write_blocks(plc: Plc, t0: dt.datetime, ks: range) -> None:
    for k in ks:
        await plc.write(
            "wave",
            block_values(k),
            ua.VariantType.Float,
            ts=t0 + dt.timedelta(microseconds=k * BLOCK_US),
        )


async def stream_start(w: Watcher, prefix: str) -> dt.datetime:
    """The start of the value the vibration tag had (published first): blocks written at
    ``stream_start + k`` block lengths follow it back to back, as a PLC's stream does. A
    stream restarted at "now" would leave a hole after it, which the adapter rightly counts
    as missing blocks: under load the hole grew past 1.5 blocks, and a test failed."""
    had = await next_data(w, prefix, has("vibration"))
    t0_us = next(m.value.t0_us for m in had.metrics if isinstance(m.value, Waveform))
    return dt.datetime.fromtimestamp(t0_us / 1e6, dt.UTC)


async def blocks_until(w: Watcher, prefix: str, last: int, timeout: float = 15.0) -> list[Waveform]:
    """The waveform blocks published until the one of stream position ``last``."""
    got: list[Waveform] = []
    while not got or got[-1].values()[0] != last * 1000:
        data = await next_data(w, prefix, has("vibration"), timeout)
        got.extend(m.value for m in data.metrics if isinstance(m.value, Waveform))
    return got


async def test_blocks_written_faster_than_the_publishing_interval_all_arrive_numbered_in_a_row(
    plc: Plc, memory_url: str, prefix: str
) -> None:
    """Before: the waveform item sampled at the publishing interval with a queue of 10, so
    40 blocks within one cycle arrived as 10, numbered 1..10 as if nothing was missing."""
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[vibration(plc)])],
            **FAST,
        ) as node,
    ):
        t0 = await stream_start(w, prefix)
        await write_blocks(plc, t0, range(1, 41))  # 1 s of signal in a few ms
        blocks = await blocks_until(w, prefix, 40)
        assert [b.values()[0] / 1000 for b in blocks] == list(range(1, 41))
        assert [b.block - blocks[0].block for b in blocks] == list(range(40))
        assert counter(node, "uns_opcua_blocks_missing_total") == 0


async def test_a_server_that_outruns_the_adapter_waits_on_the_server_not_in_its_memory(
    plc: Plc,
) -> None:
    """Before: the adapter queued up to 64 publish responses whatever their size, so a
    server writing waveforms faster than it could publish them grew it to 2.7 GB
    (`uns bench slowtags`, the OPC UA ceiling). Now it holds at most `max_values` values
    (or one response): the rest waits in the server's queue, and none is lost."""
    session = UaSession(plc.url, Credentials(), max_values=4 * WAVE_LEN)
    await session.connect()
    try:
        monitor = Monitor(1, f"ns={plc.ns};s=Press01.Vibration", 0, 1000, every_timestamp=True)
        assert await session.subscribe(20, [monitor]) == [None]
        t0 = dt.datetime.now(dt.UTC)
        for k in range(1, 201, 10):  # 10 blocks every 30 ms, and nobody reads meanwhile
            await write_blocks(plc, t0, range(k, k + 10))
            await asyncio.sleep(0.03)  # the server's pace (not a wait for anything)
        got: list[float] = []
        held: list[tuple[int, int]] = []  # (values held as a batch was taken, its own values)
        async for batch in session.batches():
            weight = sum(len(c.value) for c in batch if isinstance(c.value, list))
            held.append((session.held_values + weight, weight))
            got += [c.value[0] / 1000 for c in batch if isinstance(c.value, list)]
            if got and got[-1] == 200:
                break
    finally:
        await session.close()
    assert got[got.index(1) :] == list(range(1, 201))  # after the value it had: every block
    assert len(held) > 2  # the writes spanned several publishing cycles
    assert all(total <= max(4 * WAVE_LEN, own) for total, own in held)


async def test_a_block_the_server_dropped_leaves_a_hole_in_the_block_counter(
    plc: Plc, memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: the counter stepped by 1 across a lost block, so no consumer could tell."""
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            # the old default: a queue of 10 per 100 ms publishing cycle
            devices=[UaDevice(path=device_path(prefix), tags=[vibration(plc, sampling_ms=100)])],
            **FAST,
        ) as node,
    ):
        t0 = await stream_start(w, prefix)
        blocks: list[Waveform] = []
        for k in range(1, 6):  # a few at the pace of the stream
            await write_blocks(plc, t0, range(k, k + 1))
            blocks += await blocks_until(w, prefix, k)
        await write_blocks(plc, t0, range(6, 106))  # 100 in a cycle or two: the queue keeps 10
        blocks += await blocks_until(w, prefix, 105)
        got = [int(b.values()[0] // 1000) for b in blocks]
        assert got[:5] == [1, 2, 3, 4, 5] and len(got) < 105  # the server did drop some ...
        lost = 105 - len(got)
        # ... and the counter says where: its steps are the steps in the stream
        assert [b.block - blocks[0].block for b in blocks] == [k - 1 for k in got]
        assert counter(node, "uns_opcua_blocks_missing_total") == lost
    [line] = [m for m in adapter_lines(logs) if "block(s) missing" in m]
    assert "the block counter skips them" in line  # one line a minute, however many holes


# ---- item 11: nsu= NodeIds and the browse output ------------------------------------------------


async def test_browse_output_loads_as_a_config_and_keeps_working_when_the_namespaces_move(
    memory_url: str, prefix: str, tmp_path: Path
) -> None:
    """Before: browse wrote ns=2;... (wrong once the project is rebuilt), its waveform tag
    had no rate_hz so the config was refused, and a nsu= node failed with BadNodeIdUnknown."""
    port = free_port()
    server = await start_plc(port)
    try:
        text = await browse(server.url, enterprise=prefix)
        plant = tmp_path / "plant.yaml"
        plant.write_text(f"namespace: {{enterprise: {prefix}, site: pune}}\n{text}")
        settings = load(plant, environ={}).service("opcua-adapter", OpcUaAdapterSettings)
        [device] = settings.devices
        assert {t.name: t.node for t in device.tags} == {
            "bearing_temp": f"nsu={NS};s=Press01.BearingTemp",
            "vibration": f"nsu={NS};s=Press01.Vibration",
        }
        section = msgspec.to_builtins(settings)  # the loaded settings, as they are ...
        section.update(FAST, metrics_port=0)  # ... but quick to retry, on a free port
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(OpcUaAdapter, memory_url, prefix, **section),
        ):
            birth: DeviceBirth = await w.wait_topic("/raw/birth")
            assert {m.name: m.source for m in birth.metrics}["bearing_temp"] == (
                f"opcua:nsu={NS};s=Press01.BearingTemp"
            )
            await server.write("temp", 42.0, ua.VariantType.Double)
            await w.wait_for(lambda m: m.topic.endswith("/raw/data") and b"42.0" in m.payload)
            # the PLC project is rebuilt: same URI, now at another index
            await server.stop()
            await w.wait_topic("/raw/death")
            server = await restart_plc(port, namespaces_before=3)
            assert server.ns == 5
            await w.wait_topic("/raw/birth", timeout=20.0)
            await server.write("temp", 43.5, ua.VariantType.Double)
            await server.write("wave", block_values(7), ua.VariantType.Float)
            seen: dict[str, Any] = {}

            def both(m: Any) -> bool:
                if m.topic.endswith("/raw/data"):
                    seen.update((x.name, x.value) for x in decode(m.payload).metrics)
                return (
                    seen.get("bearing_temp") == 43.5
                    and isinstance(wave := seen.get("vibration"), Waveform)
                    and wave.values()[0] == 7000.0
                )

            await w.wait_for(both, timeout=15.0)
    finally:
        await server.stop()


async def test_a_namespace_the_server_does_not_have_is_one_line_and_the_tag_bad(
    plc: Plc, memory_url: str, prefix: str, logs: Records
) -> None:
    missing = Tag(name="oil", node="nsu=urn:nobody:here;s=Press01.Oil")
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[TEMP, missing])],
            **FAST,
        ),
    ):
        data = await next_data(w, prefix, has("oil"))
        [oil] = [m for m in data.metrics if m.name == "oil"]
        assert (oil.quality, oil.reason) == ("bad", "BadNodeIdUnknown")
        await plc.write("temp", 12.5, ua.VariantType.Double)
        await next_data(w, prefix, has("bearing_temp", 12.5))
    [line] = [m for m in adapter_lines(logs) if "'oil'" in m]
    assert "the server has no namespace urn:nobody:here" in line
