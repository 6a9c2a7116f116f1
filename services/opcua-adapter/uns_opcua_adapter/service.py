"""``uns run opcua-adapter``: an OPC UA server's tags as raw device data.

One session, one subscription (publishing every ``publishing_interval_ms``), one
monitored item per tag. Per publishing cycle each device gets one data message
with every metric that changed (a value may appear more than once, each with its
own source timestamp); an array node of a ``waveform`` tag gives one message per
array value, a `Waveform` block. A lost server: every device's death, then
reconnects with jittered backoff, births, data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from uns import DevicePath, Metric, Node, Service
from uns_opcua_adapter import logic
from uns_opcua_adapter.logic import DevicePlan, TagPlan
from uns_opcua_adapter.settings import OpcUaAdapterSettings, credentials
from uns_opcua_adapter.ua import Monitor, UaSession, UaUnavailable

log = logging.getLogger(__name__)

ERROR_REASONS = ("connect", "rejected", "lost", "node", "value")
_MISSED_LOG_S = 60.0


def _seconds(delay: float) -> str:
    """60 -> "60", 0.25 -> "0.2": whole seconds once they are many."""
    return f"{delay:.0f}" if delay >= 10 else f"{delay:.1f}".removesuffix(".0")


def _source(configured: str, resolved: str | None) -> str | None:
    """The NodeId a birth names: a ``nsu=`` node as configured (its index is only this
    session's), anything else as resolved (a browse path becomes its NodeId)."""
    return configured if configured.startswith("nsu=") else resolved


class OpcUaAdapter(Service[OpcUaAdapterSettings]):
    name = "opcua-adapter"
    Settings = OpcUaAdapterSettings

    def __init__(self, node: Node[OpcUaAdapterSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.devices: list[DevicePlan] = s.plan()
        self.credentials = credentials(s)  # a missing certificate or password file stops us here
        if s.security.mode != "none" and s.security.server_certificate is None:
            log.info(
                "%s: no security.server_certificate: trusting the certificate %s presents",
                node.id,
                s.url,
            )
        # client handle -> (device, tag): handles are 1.. in config order, stable across sessions
        self.tags: dict[int, tuple[DevicePlan, TagPlan]] = {}
        self.handles: dict[DevicePath, list[int]] = {}
        for device in self.devices:
            for tag in device.tags:
                handle = len(self.tags) + 1
                self.tags[handle] = (device, tag)
                self.handles.setdefault(device.path, []).append(handle)
        self.blocks: dict[int, logic.BlockClock] = {}
        """Block numbering per waveform handle; it keeps counting across sessions, so the
        blocks lost while the server was away leave a hole in the numbers too."""
        self._missed_logged: dict[int, tuple[float, int]] = {}
        """Per waveform handle: when missed blocks were last logged, and how many since."""
        self.born: list[DevicePath] = []
        self.last: dict[DevicePath, dict[str, Metric]] = {}
        """The latest value of every scalar tag, sent again after an MQTT (re)birth."""
        self._warned: set[int] = set()

        m = node.metrics
        self.notifications = m.counter(
            "uns_opcua_notifications_total", "Data changes received from the OPC UA server"
        ).labels()
        self.errors = m.counter(
            "uns_opcua_errors_total",
            "OPC UA problems: connect (unreachable), rejected (by the server), lost (session),"
            " node (a tag's node unknown or not monitorable), value (does not fit the datatype)",
            ["reason"],
            zeros=ERROR_REASONS,
        )
        self.blocks_missed = m.counter(
            "uns_opcua_blocks_missing_total",
            "Waveform blocks missing between two delivered ones (the server's queue-overflow"
            " bit, or a hole of up to 10 s in the blocks' back-to-back SourceTimestamps);"
            " the published block counter skips them",
        ).labels()
        self.session_up = m.gauge(
            "uns_opcua_session_up", "1 while the OPC UA session is up and subscribed"
        ).labels()
        self.latency = m.histogram(
            "uns_opcua_publish_latency_seconds",
            "From a value's SourceTimestamp to its data message queued for publishing",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ).labels()

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        if not self.devices:
            log.info(
                "%s: no devices under services.%s.devices; not connecting to %s",
                self.node.id,
                self.node.service,
                s.url,
            )
            return
        closing: set[asyncio.Task[None]] = set()
        try:
            await self._loop(closing)
        finally:
            for task in closing:  # sessions still being closed in the background
                task.cancel()
            await asyncio.gather(*closing, return_exceptions=True)

    async def _loop(self, closing: set[asyncio.Task[None]]) -> None:
        s = self.settings
        attempt = 0
        logins_refused = 0
        while True:
            session = UaSession(
                s.url,
                self.credentials,
                timeout_s=s.timeout_s,
                watchdog_s=s.watchdog_s,
                keepalive_failures=s.keepalive_failures,
            )
            started = time.monotonic()
            try:
                await session.connect()
                logins_refused = 0
                await self._serve(session)
                raise AssertionError("a session ends with UaUnavailable")  # pragma: no cover
            except UaUnavailable as exc:
                self.errors.labels(exc.kind).inc()
                problem = exc
            finally:
                self.session_up.set(0)
                if not session.lost:  # stopping, or it never connected: close it now
                    await session.close()
            if time.monotonic() - started >= s.reconnect_max_s * 2:
                attempt = 0  # it served a while: this is a new outage
            delay = self._backoff(attempt)
            attempt += 1
            if problem.refusal == "login":  # retrying at the reconnect pace locks the account
                delay = logic.refused_delay(
                    logins_refused, s.login_retry_min_s, s.login_retry_max_s
                )
                logins_refused += 1
                log.warning(
                    "%s: OPC UA server %s: %s; next try in %s s so the PLC does not lock"
                    " the account",
                    self.node.id,
                    s.url,
                    problem,
                    _seconds(delay),
                )
            elif problem.refusal == "certificate":  # nothing changes until someone acts
                delay = s.certificate_retry_s
                log.warning(
                    "%s: OPC UA server %s: %s; next try in %s s",
                    self.node.id,
                    s.url,
                    problem,
                    _seconds(delay),
                )
            if self.born:  # deaths first: closing a session on a dead link takes a timeout
                reason = f"opcua: {problem}"
                for path in self.born:
                    await self.node.device_death(path, "raw", reason)
                self.born = []
                self.last.clear()
                log.warning(
                    "%s: lost OPC UA server %s: %s; devices dead, reconnecting in %.1f s",
                    self.node.id,
                    s.url,
                    problem,
                    delay,
                )
            elif problem.refusal is None:
                log.warning(
                    "%s: OPC UA server %s: %s; retrying in %.1f s",
                    self.node.id,
                    s.url,
                    problem,
                    delay,
                )
            if session.lost:
                task = asyncio.create_task(session.close(), name=f"{self.node.id}-ua-close")
                closing.add(task)
                task.add_done_callback(closing.discard)
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2.0 ** min(attempt, 16))
        return delay * random.uniform(0.8, 1.2)

    async def _serve(self, session: UaSession) -> None:
        """Births, subscription, then data until the session is lost (`UaUnavailable`)."""
        s = self.settings
        handles = list(self.tags)
        resolved = await session.resolve([self.tags[h][1].node for h in handles])
        node_ids = {h: r[0] for h, r in zip(handles, resolved, strict=True)}
        bad: dict[int, str] = {h: r[1] for h, r in zip(handles, resolved, strict=True) if r[1]}

        for device in self.devices:
            defs = [
                self.tags[h][1].metric_def(_source(self.tags[h][1].node, node_ids[h]))
                for h in self.handles[device.path]
            ]
            await self.node.device_birth(device.path, "raw", defs)
            self.born.append(device.path)

        monitors: list[Monitor] = []
        for handle, node_id in node_ids.items():
            if node_id is None:
                continue
            tag = self.tags[handle][1]
            monitors.append(
                Monitor(
                    handle=handle,
                    node=node_id,
                    sampling_ms=tag.sampling_ms,
                    queue_size=logic.queue_size(s.publishing_interval_ms, tag.sampling_ms),
                    deadband=tag.deadband,
                    every_timestamp=tag.datatype == "waveform",
                )
            )
        statuses = await session.subscribe(s.publishing_interval_ms, monitors)
        bad.update({m.handle: st for m, st in zip(monitors, statuses, strict=True) if st})
        await self._publish_bad_nodes(bad)

        self.session_up.set(1)
        self._warned.clear()
        log.info(
            "%s: subscribed to %d of %d tags of %d devices on %s (publishing every %g ms)",
            self.node.id,
            len(self.tags) - len(bad),
            len(self.tags),
            len(self.devices),
            s.url,
            session.publishing_interval_ms,
        )
        async for batch in session.batches():
            await self._publish(batch)

    async def _publish_bad_nodes(self, bad: dict[int, str]) -> None:
        """Tags whose node does not exist: a clear log line each, and quality bad."""
        metrics: dict[DevicePath, list[Metric]] = {}
        for handle, reason in sorted(bad.items()):
            device, tag = self.tags[handle]
            log.error(
                "%s: device %s, tag %r: node %s cannot be monitored: %s; publishing it as bad",
                self.node.id,
                device.path,
                tag.name,
                tag.node,
                reason,
            )
            self.errors.labels("node").inc()
            code = reason.split(":", 1)[0]  # "BadNodeIdUnknown: the server has no namespace …"
            metrics.setdefault(device.path, []).append(
                Metric(name=tag.name, value=None, quality="bad", reason=code)
            )
        for path, items in metrics.items():
            await self.node.device_data(path, "raw", items)

    async def on_rebirth(self) -> None:
        """After an MQTT reconnect or a rebirth request: the births carry no values and the
        server reports only changes, so send every device's current values once."""
        for path in self.born:
            values = self.last.get(path)
            if values:
                await self.node.device_data(path, "raw", list(values.values()))

    async def _publish(self, batch: list[logic.Change]) -> None:
        """One publishing cycle: a message per device, a message per waveform block."""
        per_device: dict[DevicePath, list[Metric]] = {}
        for change in batch:
            entry = self.tags.get(change.handle)
            if entry is None:
                continue
            device, tag = entry
            if tag.datatype == "waveform":
                clock = self.blocks.setdefault(change.handle, logic.BlockClock())
                metric, numbered = logic.waveform_metric(tag, change, clock)
                if numbered is not None and numbered.skipped:
                    self._skipped(device, tag, change.handle, numbered)
                self._check(change, device, tag, metric)
                await self.node.device_data(device.path, "raw", [metric])
            else:
                metric, _ = logic.scalar_metric(tag, change)
                self._check(change, device, tag, metric)
                per_device.setdefault(device.path, []).append(metric)
                self.last.setdefault(device.path, {})[metric.name] = metric
        for path, metrics in per_device.items():
            await self.node.device_data(path, "raw", metrics)
        self.notifications.inc(len(batch))
        queued_us = time.time_ns() // 1000
        for change in batch:
            self.latency.observe(max(0, queued_us - change.ts_us) / 1e6)
        log.debug("%s: %d changes published", self.node.id, len(batch))

    def _skipped(
        self, device: DevicePlan, tag: TagPlan, handle: int, numbered: logic.Numbered
    ) -> None:
        """Count blocks the server lost (one line per tag and minute at most); a pause of
        the stream is one line of its own."""
        if not numbered.lost:
            log.info(
                "%s: device %s, waveform %r: the blocks resume after %.1f s without any;"
                " the block counter skips %d",
                self.node.id,
                device.path,
                tag.name,
                numbered.hole_us / 1e6,
                numbered.skipped,
            )
            return
        self.blocks_missed.inc(numbered.lost)
        now = time.monotonic()
        last, pending = self._missed_logged.get(handle, (-math.inf, 0))
        pending += numbered.lost
        if now - last < _MISSED_LOG_S:
            self._missed_logged[handle] = (last, pending)
            return
        self._missed_logged[handle] = (now, 0)
        log.warning(
            "%s: device %s, waveform %r: %d block(s) missing (the server's queue overflowed,"
            " or a hole in the blocks' timestamps); the block counter skips them",
            self.node.id,
            device.path,
            tag.name,
            pending,
        )

    def _check(self, change: logic.Change, device: DevicePlan, tag: TagPlan, m: Metric) -> None:
        if m.reason != logic.TYPE_MISMATCH or change.status_name == logic.TYPE_MISMATCH:
            return
        self.errors.labels("value").inc()
        if change.handle not in self._warned:  # once per tag and session
            self._warned.add(change.handle)
            log.warning(
                "%s: device %s, tag %r: the server sent a value that is not a %s;"
                " publishing it as bad %s",
                self.node.id,
                device.path,
                tag.name,
                tag.datatype,
                logic.TYPE_MISMATCH,
            )
