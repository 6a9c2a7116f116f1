"""The notifier against a real HTTP server (stdlib ``http.server`` in a thread, on a free
port) and a real Mosquitto: one work order per fault, a storm as one line incident, a
webhook that fails (500, 429 with Retry-After), slows and refuses (stopped: connection
refused) on cue, a ``kill -9`` of the notifier in the middle of an outage, a 400 that goes
to the dead letter while delivery goes on.

The webhook's hour-long outage stands here as an outage of a few seconds with the notifier
killed and restarted inside it: what could be lost in an hour is what is lost across its
process and its connection (the journal keeps operations 7 days, `journal.ttl_s`; the
unit tests check that an hour-old operation is not expired)."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest

from clitools import Proc, start
from fixtures.brokers import Mosquitto, started_mosquitto
from fixtures.pki import CertAuthority
from uns import Event, connect, encode
from uns.testing import free_port, running
from uns_notifier.service import Notifier

pytestmark = pytest.mark.integration

TABLE = "/api/now/table/incident"


class Receiver:
    """A webhook: the generic JSON receiver (records by ``key``) and a ServiceNow-like table
    API (records by ``sys_id``, looked up by ``correlation_id``). ``script`` is served
    first, one answer per request (500, 429 = with ``Retry-After: 1``, ``slow`` = past the
    client's timeout, ``sluggish`` = answered after 0.5 s); ``refuse`` holds keys answered
    400; `stop` closes the port (connection refused)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.records: dict[str, dict[str, Any]] = {}
        """generic: key -> work order; servicenow: sys_id -> incident."""
        self.creates: Counter[str] = Counter()
        """Creates per work order key (a re-send with the same Idempotency-Key included)."""
        self.create_keys: dict[str, set[str]] = {}
        self.script: list[int | str] = []
        self.refuse: set[str] = set()
        self.server: ThreadingHTTPServer | None = None
        self.tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def start(self, tls: tuple[Path, Path] | None = None) -> None:
        receiver = self
        if tls is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                receiver.handle(self)

            def do_POST(self) -> None:
                receiver.handle(self)

            def do_PATCH(self) -> None:
                receiver.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self.lock:
            self.requests.append((h.command, h.path, headers, body))
            cue = self.script.pop(0) if self.script else None
        if cue == "slow":
            time.sleep(1.5)  # past the notifier's timeout_s (1 s): a timeout, sent again
        elif cue == "sluggish":
            time.sleep(0.5)  # slow, within the timeout: answered normally
            cue = None
        if cue is not None and cue != "slow":
            extra = {"Retry-After": "1"} if cue == 429 else {}
            return self.answer(h, int(cue), {"error": f"cue {cue}"}, extra)
        with self.changed:
            status, answer = self.apply(h.command, h.path, headers, body)
            self.changed.notify_all()
        self.answer(h, status, answer)

    def answer(
        self, h: BaseHTTPRequestHandler, status: int, body: Any, extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        try:
            h.wfile.write(data)
        except BrokenPipeError:
            pass  # the notifier timed out on a slow answer and went away

    def apply(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        idem = headers.get("idempotency-key", "")
        url = urlsplit(path)
        if url.path.startswith(TABLE):  # ServiceNow
            if method == "GET":
                query = parse_qs(url.query)["sysparm_query"][0].removeprefix("correlation_id=")
                found = [
                    {"sys_id": k} for k, r in self.records.items() if r["correlation_id"] == query
                ]
                return 200, {"result": found[:1]}
            if method == "POST":
                key = body["correlation_id"]
                if key in self.refuse:
                    return 400, {"error": {"message": "Invalid cmdb_ci", "detail": key}}
                self.creates[key] += 1
                self.create_keys.setdefault(key, set()).add(idem)
                sys_id = uuid.uuid4().hex
                self.records[sys_id] = {**body, "state": "1", "notes": []}
                return 201, {"result": {"sys_id": sys_id, "number": f"INC{len(self.records):07d}"}}
            sys_id = url.path.rsplit("/", 1)[1]
            if sys_id not in self.records:
                return 404, {"error": {"message": "No Record found"}}
            record = self.records[sys_id]
            record["notes"].append(body["work_notes"])
            record.update({k: v for k, v in body.items() if k != "work_notes"})
            return 200, {"result": {"sys_id": sys_id}}
        key = body["key"]
        if key in self.refuse:
            return 400, {"error": "refused", "key": key}
        if body["action"] == "open":
            self.creates[key] += 1
            self.create_keys.setdefault(key, set()).add(idem)
            self.records.setdefault(key, {**body, "ops": []})
        record = self.records.get(key)
        if record is None:
            return 404, {"error": "unknown key"}
        if idem not in record["ops"]:
            record["ops"].append(idem)
        record.update(status=body["status"], events=body["events"], severity=body["severity"])
        return 200, {"ok": True}

    async def until(self, predicate: Callable[[], bool], why: str, timeout: float = 60) -> None:
        def wait() -> bool:
            with self.changed:
                return self.changed.wait_for(predicate, timeout)

        if not await asyncio.to_thread(wait):
            with self.lock:
                raise AssertionError(f"{why}; the webhook has {self.records}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def event(prefix: str, device: str, state: str, eid: str, severity: str = "critical") -> Event:
    now = int(time.time() * 1000)
    return Event(
        ts=now,
        data_ts=now,
        id=eid,
        kind="anomaly",
        state=state,  # type: ignore[arg-type]
        device=f"{prefix}/pune/stamping/{device}",
        started=now - 30_000,
        severity=severity,  # type: ignore[arg-type]
        summary=f"Anomaly on {device.rsplit('/', 1)[1]}: {state}",
        score=9.5,
        threshold=6.0,
        details={"top_features": "vibration.rms"},
    )


async def publish(url: str, events: list[Event]) -> None:
    async with connect(url, client_id=f"inference-{uuid.uuid4().hex[:6]}") as bus:
        for e in events:
            await bus.publish(f"{e.device}/events/anomaly", encode(e), qos=1)


def settings(tmp_path: Path, receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "auth").write_text("Bearer s3cret\n")
    webhook = {
        "url": receiver.url,
        "allow_plaintext": receiver.tls is None,
        "auth_file": str(tmp_path / "auth"),
        "retry_min_s": 0.05,
        "retry_max_s": 0.5,
        "timeout_s": 1.0,
        **overrides.pop("webhook", {}),
    }
    return {
        "enabled": True,
        "webhook": webhook,
        "state_file": str(tmp_path / "notifier-state.json"),
        "journal": {"path": str(tmp_path / "notifier-journal.sqlite")},
        "correlate_s": 0.5,
        "correlate_min": 5,
        **overrides,
    }


@asynccontextmanager
async def notifier(url: str, prefix: str, s: dict[str, Any]) -> AsyncIterator[Any]:
    async with running(Notifier, url, prefix, **s) as node:
        yield node


def sample(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, {"service": "notifier", **labels})
    return float(value or 0.0)


async def until_metric(node: Any, name: str, value: float, **labels: str) -> None:
    async with asyncio.timeout(30):
        while sample(node, name, **labels) < value:  # noqa: ASYNC110 (a metric: no event)
            await asyncio.sleep(0.02)


# ---- one work order per fault ---------------------------------------------------------------


async def test_a_single_fault_opens_one_incident_and_its_clear_resolves_it(
    mosquitto: Mosquitto, receiver: Receiver, prefix: str, tmp_path: Path
) -> None:
    s = settings(tmp_path, receiver, webhook={"preset": "servicenow", "fields": {"category": "hw"}})
    device = "line-3/cell-a/press-01"
    async with notifier(mosquitto.url, prefix, s) as node:
        await publish(mosquitto.url, [event(prefix, device, "raised", "e-1")])
        await receiver.until(lambda: len(receiver.records) == 1, "no incident opened")
        await publish(mosquitto.url, [event(prefix, device, "raised", "e-1")])  # again
        await until_metric(node, "uns_notifier_duplicates_total", 1)
        await publish(mosquitto.url, [event(prefix, device, "cleared", "e-1")])
        await receiver.until(
            lambda: next(iter(receiver.records.values()))["state"] == "6", "never resolved"
        )
    [(sys_id, incident)] = receiver.records.items()
    assert incident["correlation_id"] == "e-1"
    assert incident["cmdb_ci"] == f"{prefix}/pune/stamping/{device}"
    assert (incident["urgency"], incident["impact"]) == ("1", "1")  # critical
    assert incident["category"] == "hw"
    assert incident["short_description"] == "Anomaly on press-01: raised"
    assert incident["close_code"] and "cleared" in incident["close_notes"]
    assert receiver.creates == {"e-1": 1}
    patches = [(m, p) for m, p, _, _ in receiver.requests if m == "PATCH"]
    assert patches == [("PATCH", f"{TABLE}/{sys_id}")]
    posts = [h for m, _, h, _ in receiver.requests if m == "POST"]
    assert posts[0]["authorization"] == "Bearer s3cret"
    assert posts[0]["idempotency-key"] == "e-1"


async def test_a_storm_of_40_devices_on_one_line_opens_one_incident(
    mosquitto: Mosquitto, receiver: Receiver, prefix: str, tmp_path: Path
) -> None:
    s = settings(tmp_path, receiver, correlate_s=10.0, correlate_min=5)
    devices = [f"line-3/cell-{'abcd'[i % 4]}/press-{i:02d}" for i in range(40)]
    storm = [event(prefix, d, "raised", f"s-{i}") for i, d in enumerate(devices)]
    lone = event(prefix, "line-4/cell-a/press-01", "raised", "lone-1")
    async with notifier(mosquitto.url, prefix, s):
        await publish(mosquitto.url, [*storm, lone])
        await receiver.until(
            lambda: any(len(r["events"]) == 40 for r in receiver.records.values()),
            "the storm's 40 events never all reached one incident",
        )
        await publish(
            mosquitto.url,
            [event(prefix, d, "cleared", f"s-{i}") for i, d in enumerate(devices)],
        )
        await receiver.until(
            lambda: receiver.records[storm[0].id + "-storm"]["status"] == "resolved",
            "the line incident was never resolved",
        )
        await receiver.until(lambda: "lone-1" in receiver.records, "the lone fault never opened")
    line = receiver.records["s-0-storm"]
    assert line["kind"] == "line" and line["path"] == f"{prefix}/pune/stamping/line-3"
    assert {e["id"] for e in line["events"]} == {e.id for e in storm}
    assert all(e["state"] == "cleared" for e in line["events"])
    assert receiver.creates == {"s-0-storm": 1, "lone-1": 1}  # one per line, not per device
    assert receiver.records["lone-1"]["kind"] == "device"
    resolves = [b for m, _, _, b in receiver.requests if b and b["action"] == "resolve"]
    assert [b["key"] for b in resolves] == ["s-0-storm"]  # once, after the last clear
    assert len(line["ops"]) == len(set(line["ops"]))


async def test_a_400_goes_to_the_dead_letter_and_delivery_goes_on(
    mosquitto: Mosquitto,
    receiver: Receiver,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.refuse = {"bad-1"}
    s = settings(tmp_path, receiver, correlate_s=0)
    async with notifier(mosquitto.url, prefix, s) as node:
        await publish(
            mosquitto.url,
            [
                event(prefix, "line-3/cell-a/press-01", "raised", "bad-1"),
                event(prefix, "line-3/cell-a/press-01", "cleared", "bad-1"),
                event(prefix, "line-3/cell-a/press-02", "raised", "good-1"),
            ],
        )
        await receiver.until(lambda: "good-1" in receiver.records, "delivery stopped at the 400")
        await until_metric(node, "uns_notifier_dead_letters_total", 1, reason="http_4xx")
        assert sample(node, "uns_notifier_dead_letters_total", reason="order_refused") == 1
    refused = [r for r in caplog.records if "refused open of work order bad-1" in r.getMessage()]
    assert len(refused) == 1 and "HTTP 400" in refused[0].getMessage()
    assert "Invalid cmdb_ci" in refused[0].getMessage() or "refused" in refused[0].getMessage()
    assert list(receiver.records) == ["good-1"]


async def test_tls_is_verified_against_ca_file(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """HTTPS to a server whose certificate a private CA signed: delivered with that CA as
    ca_file; with the system store instead it is never sent (retried as a connection
    error), so a man in the middle gets nothing."""
    ca = CertAuthority(tmp_path)
    receiver = Receiver()
    receiver.start(tls=ca.issue("webhook", server=True))
    try:
        untrusted = settings(tmp_path / "a", receiver, correlate_s=0)
        async with notifier(mosquitto.url, prefix, untrusted) as node:
            await publish(mosquitto.url, [event(prefix, "line-3/cell-a/press-01", "raised", "t1")])
            await until_metric(node, "uns_notifier_retries_total", 1, reason="connect")
        assert receiver.records == {}
        trusted = settings(tmp_path / "b", receiver, correlate_s=0, webhook={"ca_file": str(ca.ca)})
        async with notifier(mosquitto.url, f"{prefix}b", trusted):
            await publish(
                mosquitto.url, [event(f"{prefix}b", "line-3/cell-a/press-01", "raised", "t2")]
            )
            await receiver.until(lambda: "t2" in receiver.records, "not delivered over TLS")
    finally:
        receiver.stop()


# ---- outage and restart -------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = started_mosquitto(tmp_path, name="plant", extra="max_queued_messages 10000\n")
    yield b
    b.kill()


def config_file(tmp_path: Path, prefix: str, broker: Mosquitto, receiver: Receiver) -> Path:
    s = settings(tmp_path, receiver, correlate_s=0.3, webhook={"preset": "servicenow"})
    config = {
        "namespace": {"enterprise": prefix, "site": "pune"},
        "broker": {"url": broker.url},
        "services": {"notifier": {**s, "metrics_port": 0}},
    }
    path = tmp_path / "notifier.yaml"
    path.write_bytes(msgspec.yaml.encode(config))
    return path


async def run_notifier(procs: list[Proc], config: Path) -> Proc:
    args = ("run", "notifier", "--config", str(config))
    return await asyncio.to_thread(start, procs, *args, ready="births published")


async def test_an_outage_with_a_kill_9_in_the_middle_loses_and_duplicates_nothing(
    broker: Mosquitto, receiver: Receiver, prefix: str, tmp_path: Path, procs: list[Proc]
) -> None:
    config = config_file(tmp_path, prefix, broker, receiver)
    first = [event(prefix, f"line-{i}/cell-a/press-01", "raised", f"f-{i}") for i in range(8)]
    clears = [event(prefix, f"line-{i}/cell-a/press-01", "cleared", f"f-{i}") for i in range(4)]
    later = [event(prefix, f"line-{i}/cell-b/robot-01", "raised", f"g-{i}") for i in range(8, 12)]
    proc = await run_notifier(procs, config)
    await publish(broker.url, first[:2])
    await receiver.until(lambda: len(receiver.records) == 2, "the first two never opened")
    receiver.stop()  # the webhook goes away: connection refused
    await publish(broker.url, first[2:] + clears[:2])
    await asyncio.to_thread(proc.wait_line, "webhook: ")  # it is backing off
    proc.stop(signal.SIGKILL)  # and the notifier dies in the middle of the outage
    await publish(broker.url, clears[2:] + later)  # queued by the broker for it
    receiver.script = [500, 429, "slow", "sluggish", 500]  # the webhook comes back, badly
    receiver.start()
    again = await run_notifier(procs, config)
    by_key = lambda: {r["correlation_id"]: r for r in receiver.records.values()}  # noqa: E731
    expected = {e.id for e in first + later}
    await receiver.until(
        lambda: set(by_key()) == expected and all(by_key()[e.id]["state"] == "6" for e in clears),
        "work orders lost across the outage and the restart",
    )
    again.stop()
    assert "Traceback" not in "".join(again.lines + proc.lines)
    assert all(n == 1 for n in receiver.creates.values()), receiver.creates
    assert {k for k, r in by_key().items() if r["state"] == "6"} == {e.id for e in clears}
    assert receiver.script == []  # 500, 429, a timeout, a slow answer, 500 were served
    assert any("webhook: " in line and "HTTP 500" in line for line in again.lines)
