"""The poll loop: the only module that talks to pymodbus.

Each unit and poll group has its own task and schedule. pymodbus sends one request at a
time per connection, so a unit that does not answer holds the connection for
``timeout_s``: measured on one shared connection, a silent unit took a healthy unit's
poll interval p95 from 216 ms to 1,003 ms. A unit whose poll fails therefore moves to a
second connection (one, shared by every failing unit) until it answers again; the units
on the shared connection pay for its first timeout only. An endpoint that refuses a
second connection gets the failing unit's polls on the shared one, backed off once dead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from uns import DevicePath, Metric, MetricDef, Node, Service, now_ms
from uns_modbus_adapter.logic import Read, Reporter, Value, is_finite, metric_def, plan_groups
from uns_modbus_adapter.settings import ModbusAdapterSettings, ModbusDevice

log = logging.getLogger(__name__)

_NO_AUTO_DISCONNECT = 1 << 30
"""pymodbus closes the TCP connection after a few unanswered requests in a row; one
silent unit behind a gateway must not take every other unit down, so never."""


class _ConnectionLost(Exception):
    pass


class _SpareLost(Exception):
    """The second connection dropped (or was closed at once): not the unit's failure."""


class _ReadFailed(Exception):
    def __init__(self, reason: str, detail: str, *, device_failure: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.device_failure = device_failure


# Exception codes meaning "your request is wrong" (the unit answered): the metrics of that
# read are bad, the device is alive. Every other code (device failure, busy, gateway
# path unavailable / target not responding) counts as a failed poll of the device.
_REQUEST_ERRORS = frozenset({1, 2, 3})
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def _cancel_requests() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _reraise_lost_cancel(before: int) -> None:
    """pymodbus waits with ``asyncio.wait_for``, which on Python 3.11 can swallow a
    cancellation that races the answer; the task then polls on and a stop hangs (seen
    in the tests). A cancellation requested since ``before`` (the task's count of them,
    which 3.11's TaskGroup can leave above 0 after an error) is raised again here."""
    if _cancel_requests() > before:
        raise asyncio.CancelledError


@dataclass
class _Device:
    """One configured unit and what the loop knows about it."""

    config: ModbusDevice
    path: DevicePath
    defs: list[MetricDef]
    plans: dict[str, list[Read]]
    reporter: Reporter
    alive: bool = False
    """Born on the current connection and not dead since."""
    announced_dead: bool = False
    """A death was published and no birth since (so an outage publishes one death)."""
    failures: int = 0
    retry_at: float = 0.0
    logged_reasons: set[str] = field(default_factory=set)
    isolated: bool = False
    """Its last poll failed: polled on the second connection, not the shared one."""

    @property
    def unit(self) -> int:
        return self.config.unit_id

    @property
    def first_group(self) -> str:
        """The group whose task probes the unit while it is dead (one probe, not one per group)."""
        return next(iter(self.plans))


class _Spare:
    """The second connection to the endpoint, for the units that do not answer.

    Opened on first use and again after it drops, with jittered backoff when refused.
    """

    def __init__(self, adapter: ModbusAdapter) -> None:
        self.adapter = adapter
        self.client: AsyncModbusTcpClient | None = None
        self.lock = asyncio.Lock()
        self.attempt = 0
        self.retry_at = 0.0
        self.refusal_logged = False

    async def get(self) -> AsyncModbusTcpClient | None:
        """The connected spare client, or None while it cannot be had."""
        async with self.lock:
            if self.client is not None and self.client.connected:
                return self.client
            self.close()
            loop = asyncio.get_running_loop()
            if loop.time() < self.retry_at:
                return None
            client = self.adapter.new_client()
            if await client.connect():  # the backoff resets on its first answer, not here
                self.client = client
                log.debug("%s: second connection to %s open", self.adapter.node.id, client)
                return client
            client.close()
            self.refused()
            return None

    def refused(self) -> None:
        """Refused, or accepted and closed at once (an endpoint that takes one client):
        back off; meanwhile the failing units are polled on the shared connection."""
        self.close()
        s = self.adapter.settings
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(self.attempt, 16))
        self.attempt += 1
        self.retry_at = asyncio.get_running_loop().time() + delay * random.uniform(0.8, 1.2)
        if not self.refusal_logged:  # once per session: the fallback is not an error
            self.refusal_logged = True
            log.warning(
                "%s: Modbus TCP %s refused a second connection; a unit that does not"
                " answer is polled on the shared one and holds the others up",
                self.adapter.node.id,
                self.adapter.endpoint,
            )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class ModbusAdapter(Service[ModbusAdapterSettings]):
    """Polls Modbus TCP units and publishes each as a device on the ``raw`` stream."""

    name = "modbus-adapter"
    Settings = ModbusAdapterSettings

    def __init__(self, node: Node[ModbusAdapterSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.endpoint = f"{s.host}:{s.port}"
        self.devices: list[_Device] = []
        for dev in s.devices:
            registers = s.registers_of(dev)
            self.devices.append(
                _Device(
                    config=dev,
                    path=DevicePath.parse(dev.path),
                    defs=[metric_def(r, dev.unit_id) for r in registers],
                    plans=plan_groups(registers, max_block=s.max_block, max_gap=s.max_gap),
                    reporter=Reporter({r.name: r.deadband for r in registers}, s.heartbeat_s),
                )
            )
        m = node.metrics
        self.reads = m.counter(
            "uns_modbus_reads_total",
            "Modbus read requests, by result (ok, error)",
            ["result"],
            zeros=("ok", "error"),
        )
        self.errors = m.counter(
            "uns_modbus_errors_total",
            "Modbus failures, by reason (timeout, exception, connection)",
            ["reason"],
            zeros=("timeout", "exception", "connection"),
        )
        self.read_seconds = m.histogram(
            "uns_modbus_read_seconds",
            "Duration of one Modbus read request",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        ).labels()
        self.publish_latency = m.histogram(
            "uns_modbus_publish_latency_seconds",
            "From a device's last read done to its data message queued for the broker",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        ).labels()
        self._spare = _Spare(self)
        if not log.isEnabledFor(logging.DEBUG):
            # pymodbus logs every failed connect and every timeout itself (with a frame dump);
            # our own line per attempt / per state change says it once. DEBUG shows them all.
            logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    # ---- the connection loop ---------------------------------------------------------------

    def new_client(self) -> AsyncModbusTcpClient:
        s = self.settings
        client = AsyncModbusTcpClient(
            s.host,
            port=s.port,
            timeout=s.timeout_s,
            retries=0,
            reconnect_delay=0,  # no background reconnect: our loops own it
            name=self.node.id,
        )
        client.set_max_no_responses(_NO_AUTO_DISCONNECT)
        return client

    async def run(self) -> None:
        if not self.devices:
            log.info("%s: no devices configured (services.modbus-adapter.devices)", self.node.id)
            return
        s = self.settings
        attempt = 0
        while True:
            client = self.new_client()
            cancels = _cancel_requests()
            try:
                connected = await client.connect()
                _reraise_lost_cancel(cancels)
                if connected:
                    attempt = 0
                    log.info("%s: connected to Modbus TCP %s", self.node.id, self.endpoint)
                    await self._session(client)
                    what = "lost"
                else:
                    what = "unreachable"
            except* _ConnectionLost:
                what = "lost"
            finally:
                client.close()
                self._spare.close()
            self.errors.labels("connection").inc()
            await self._all_dead("connection")
            delay = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(attempt, 16))
            delay *= random.uniform(0.8, 1.2)
            attempt += 1
            log.warning(
                "%s: Modbus TCP %s %s; retrying in %.1f s", self.node.id, self.endpoint, what, delay
            )
            await asyncio.sleep(delay)

    async def _session(self, client: AsyncModbusTcpClient) -> None:
        self._spare.refusal_logged = False
        for dev in self.devices:
            dev.isolated = False
            await self._birth(dev)
        async with asyncio.TaskGroup() as tg:
            for dev in self.devices:
                for group in dev.plans:
                    interval = self.settings.poll_groups[group]
                    tg.create_task(
                        self._poll_loop(client, dev, group, interval),
                        name=f"poll-{dev.unit}-{group}",
                    )

    async def on_rebirth(self) -> None:
        """After an MQTT reconnect or a rebirth request the next poll sends every value."""
        for dev in self.devices:
            dev.reporter.reset()

    async def _birth(self, dev: _Device) -> None:
        dev.reporter.reset()
        dev.failures = 0
        dev.alive = True
        dev.announced_dead = False
        dev.logged_reasons.clear()
        await self.node.device_birth(dev.path, "raw", dev.defs)

    async def _death(self, dev: _Device, reason: str) -> None:
        dev.alive = False
        if not dev.announced_dead:
            dev.announced_dead = True
            await self.node.device_death(dev.path, "raw", reason)

    async def _all_dead(self, reason: str) -> None:
        for dev in self.devices:
            await self._death(dev, reason)

    # ---- polling -------------------------------------------------------------------------

    async def _poll_loop(
        self, shared: AsyncModbusTcpClient, dev: _Device, group: str, interval: float
    ) -> None:
        """Poll one unit's group every ``interval`` (a dead unit: at its backoff)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        cancels = _cancel_requests()
        while True:
            if dev.alive or (group == dev.first_group and loop.time() >= dev.retry_at):
                spare = await self._spare.get() if dev.isolated else None
                try:
                    await self._poll_device(spare or shared, dev, group, spare=spare is not None)
                except _SpareLost:
                    await self._poll_device(shared, dev, group)
                _reraise_lost_cancel(cancels)
            due += interval
            now = loop.time()
            if due < now:  # overran: skip the missed cycles rather than bunch them up
                due = now
            await asyncio.sleep(due - now)

    async def _poll_device(
        self, client: AsyncModbusTcpClient, dev: _Device, group: str, *, spare: bool = False
    ) -> None:
        values: dict[str, Value] = {}
        stamps: dict[str, int] = {}
        bad: dict[str, str] = {}
        failure: _ReadFailed | None = None
        first_ts = 0
        done = time.perf_counter()
        for read in dev.plans[group]:
            try:
                words, ts = await self._read(client, dev, read, spare=spare)
            except _ReadFailed as exc:
                for reg in read.registers:
                    bad[reg.name] = exc.reason
                self._log_failure(dev, read, exc)
                if exc.device_failure:
                    failure = exc
                    break  # the unit is not answering: do not wait out every read
                continue
            done = time.perf_counter()
            first_ts = first_ts or ts
            for name, value in read.values(words).items():
                values[name] = value
                stamps[name] = ts
        if failure is not None:
            for read in dev.plans[group]:
                for reg in read.registers:
                    bad.setdefault(reg.name, failure.reason)
            self._isolate(dev, failure.reason)
            await self._failed(dev, failure.reason)
            if not dev.alive:
                return
        else:
            dev.isolated = False  # it answers: back on the shared connection
            if not dev.alive:
                log.info("%s: unit %d answers again", dev.path, dev.unit)
                await self._birth(dev)
            else:
                dev.failures = 0
        await self._publish(dev, values, stamps, bad, first_ts or now_ms(), done)

    async def _failed(self, dev: _Device, reason: str) -> None:
        dev.failures += 1
        s = self.settings
        if dev.alive and dev.failures >= s.max_failures:
            log.warning(
                "%s: unit %d failed %d polls in a row (%s); device death, retrying with backoff",
                dev.path,
                dev.unit,
                dev.failures,
                reason,
            )
            await self._death(dev, reason)
        if not dev.alive:
            extra = dev.failures - s.max_failures
            delay = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(extra, 16))
            delay *= random.uniform(0.8, 1.2)
            dev.retry_at = asyncio.get_running_loop().time() + delay

    def _isolate(self, dev: _Device, reason: str) -> None:
        """Take a unit that failed a poll off the shared connection (see the module doc)."""
        if dev.isolated or len(self.devices) < 2:
            return
        dev.isolated = True
        if f"isolated:{reason}" not in dev.logged_reasons:  # once per reason until a birth
            dev.logged_reasons.add(f"isolated:{reason}")
            log.info(
                "%s: unit %d failed a poll (%s): polled on its own connection until it"
                " answers, so the other units keep their poll rate",
                dev.path,
                dev.unit,
                reason,
            )

    def _log_failure(self, dev: _Device, read: Read, exc: _ReadFailed) -> None:
        if exc.reason not in dev.logged_reasons:  # once per reason until the next birth
            dev.logged_reasons.add(exc.reason)
            log.warning("%s: unit %d read %s failed: %s", dev.path, dev.unit, read, exc)

    async def _publish(
        self,
        dev: _Device,
        values: dict[str, Value],
        stamps: dict[str, int],
        bad: dict[str, str],
        ts: int,
        read_done: float,
    ) -> None:
        now = time.monotonic()
        metrics: list[Metric] = []
        for name, value in dev.reporter.changed(values, now).items():
            stamp = stamps[name] if stamps[name] != ts else None
            if is_finite(value):
                metrics.append(Metric(name=name, value=value, ts=stamp))
            else:
                metrics.append(
                    Metric(name=name, value=None, ts=stamp, quality="bad", reason="nonfinite")
                )
        for name in dev.reporter.bad(bad, now):
            metrics.append(Metric(name=name, value=None, quality="bad", reason=bad[name]))
        if not metrics:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s", dev.path, metrics)
        await self.node.device_data(dev.path, "raw", metrics, ts=ts)
        self.publish_latency.observe(time.perf_counter() - read_done)

    async def _read(
        self, client: AsyncModbusTcpClient, dev: _Device, read: Read, *, spare: bool = False
    ) -> tuple[list[int], int]:
        """Words (or bits as 0/1) of one read and its time (ms); raise _ReadFailed or lost.

        Losing the shared connection ends the session; losing the spare one raises
        _SpareLost (the poll is made on the shared one, the spare opened again later)."""
        started = time.perf_counter()
        try:
            response = await self._request(client, dev.unit, read)
        except ConnectionException:
            if spare:
                raise self._spare_lost() from None
            raise _ConnectionLost from None
        except ModbusException:  # ModbusIOException: no answer within timeout_s
            if not client.connected:
                if spare:
                    raise self._spare_lost() from None
                raise _ConnectionLost from None
            self._count(started, ok=False, reason="timeout")
            raise _ReadFailed(
                "timeout", f"no answer within {self.settings.timeout_s} s", device_failure=True
            ) from None
        if spare:
            self._spare.attempt = 0  # it answers: the spare connection works
        if response.isError():
            code = response.exception_code
            self._count(started, ok=False, reason="exception")
            raise _ReadFailed(
                f"ModbusException:{code}",
                f"exception {code} ({_EXCEPTION_NAMES.get(code, 'unknown')})",
                device_failure=code not in _REQUEST_ERRORS,
            )
        ts = now_ms()
        if read.table in ("coil", "discrete"):
            words = [int(b) for b in response.bits[: read.count]]
        else:
            words = list(response.registers)
        if len(words) < read.count:
            self._count(started, ok=False, reason="exception")
            raise _ReadFailed(
                "short_response",
                f"{len(words)} values returned, {read.count} asked",
                device_failure=True,
            )
        self._count(started, ok=True)
        return words, ts

    def _spare_lost(self) -> _SpareLost:
        self.errors.labels("connection").inc()
        self._spare.refused()
        return _SpareLost()

    @staticmethod
    async def _request(client: AsyncModbusTcpClient, unit: int, read: Read) -> ModbusPDU:
        if read.table == "holding":
            return await client.read_holding_registers(
                read.address, count=read.count, device_id=unit
            )
        if read.table == "input":
            return await client.read_input_registers(read.address, count=read.count, device_id=unit)
        if read.table == "coil":
            return await client.read_coils(read.address, count=read.count, device_id=unit)
        return await client.read_discrete_inputs(read.address, count=read.count, device_id=unit)

    def _count(self, started: float, *, ok: bool, reason: str = "") -> None:
        self.read_seconds.observe(time.perf_counter() - started)
        self.reads.labels("ok" if ok else "error").inc()
        if reason:
            self.errors.labels(reason).inc()
