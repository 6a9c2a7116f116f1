"""``uns run bridge``: local broker -> SQLite journal -> remote broker, nothing lost.

Three loops share one journal (every SQLite call runs on one dedicated thread):

* intake: the Node's handlers queue each selected message; the writer commits what
  arrived during the previous commit as one transaction (group commit). A message is
  *taken* once committed; only then can it be sent, and only then is it acknowledged
  to the local broker: the local session is persistent (`persistent_session`), so what
  is published while the bridge is down, and what it had received but not committed
  when it was killed, is delivered to it again; a message sent again that is already
  in the journal is recognised (`Journal.append`) and keeps its one id.
* forward: one outbound connection (`uns.bus.connect`, TLS, mutual TLS), redialled
  with jittered backoff. Each session re-reads the journal from its oldest row and
  sends in journal order, ``remote.inflight`` QoS 1 publishes at a time, at most
  ``journal.backfill_rate`` messages/s. A message leaves the journal only after its
  PUBACK; so a lost connection or a ``kill -9`` re-sends at most the unacknowledged
  window (at-least-once; receivers drop duplicates by id).
* housekeeping: TTL expiry, reclaiming disk space after delivery, gauges, the client
  certificate's days left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from uns import Inbound, Node, NodeBirth, NodeDeath, Reject, Service, encode, now_ms
from uns.bus import Bus, Will, connect
from uns.config import BrokerSettings, parse_broker_url
from uns.errors import BusError, ConfigError
from uns.metrics import ServiceMetrics
from uns.payloads import next_seq
from uns_bridge import logic
from uns_bridge.journal import Item, Journal, JournalFull, Row
from uns_bridge.settings import BridgeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

Ack = Callable[[], None]
"""`Inbound.ack`: the message's acknowledgement to the local broker (persistent session)."""


READ_CHUNK: Final = 1000
"""Rows read from the journal at a time by the sender."""
COMMIT_MAX: Final = 5000
"""Messages committed in one transaction at most."""
ACK_FLUSH_S: Final = 0.05
ACK_FLUSH_N: Final = 1000
"""Acknowledged messages are deleted from the journal every ACK_FLUSH_S seconds or
ACK_FLUSH_N messages, whichever comes first: after a ``kill -9`` at most that many
delivered messages are sent again."""
DROP_REASONS: Final = ("expired", "cap_telemetry", "cap_event", "disk_full", "topic", "too_large")


class BridgeMetrics:
    """``uns_bridge_*`` on the node's registry."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        gauge, counter = metrics.gauge, metrics.counter
        self.journal_messages = gauge(
            "uns_bridge_journal_messages", "Messages in the journal, not yet acknowledged"
        ).labels()
        self.journal_bytes = gauge(
            "uns_bridge_journal_bytes", "Bytes of the journal on disk (database and WAL)"
        ).labels()
        self.oldest_age = gauge(
            "uns_bridge_oldest_age_seconds", "Age of the oldest message in the journal"
        ).labels()
        self.since_delivery = gauge(
            "uns_bridge_seconds_since_delivery",
            "Seconds since the remote last acknowledged a message; 0 when nothing waits",
        ).labels()
        self.forwarded = counter(
            "uns_bridge_forwarded_total", "Messages acknowledged by the remote"
        ).labels()
        self.expired = counter(
            "uns_bridge_expired_total", "Messages dropped undelivered after journal.ttl_s"
        ).labels()
        self._dropped = counter(
            "uns_bridge_dropped_total",
            "Messages dropped by the bridge: expired, cap_telemetry, cap_event, disk_full,"
            " topic, too_large",
            ["reason"],
            zeros=DROP_REASONS,
        )
        self.reconnects = counter(
            "uns_bridge_reconnects_total", "Connection attempts to the remote after the first"
        ).labels()
        self.connected = gauge(
            "uns_bridge_remote_connected", "1 while connected to the remote"
        ).labels()
        self.duplicates = counter(
            "uns_bridge_duplicates_total",
            "Messages the local broker sent again that were in the journal already (kept once)",
        ).labels()
        self.login_refusals = counter(
            "uns_bridge_login_refusals_total",
            "Connection attempts the remote refused for our credentials (each backs off"
            " remote.login_retry_min_s, doubling)",
        ).labels()
        self.cert_days_left = gauge(
            "uns_bridge_cert_days_left",
            "Days until the client certificate (remote.cert_file) expires",
        )
        self.connected.set(0)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self._dropped.labels(reason).inc(n)


class Bridge(Service[BridgeSettings]):
    """Store-and-forward of the selected streams to one remote broker."""

    name = "bridge"
    Settings = BridgeSettings
    persistent_session = True
    """What the local broker delivers stays its until committed (see the module doc)."""

    def __init__(self, node: Node[BridgeSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.metrics = BridgeMetrics(node.metrics)
        self.journal: Journal | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._intake: collections.deque[tuple[Item, Ack]] = collections.deque()
        self._intake_ready = asyncio.Event()
        self._intake_space = asyncio.Event()
        self._intake_space.set()
        self._new_data = asyncio.Event()
        self._acked: list[int] = []
        self._ack_lock = asyncio.Lock()
        self._ack_due = asyncio.Event()
        self._last_delivery_ms = 0
        self._full_logged = 0.0
        self._cert_warned = -1e9
        self.sessions = 0
        """Connections to the remote made so far."""
        self.forwarded = 0
        """Messages the remote acknowledged since the start."""
        self.changed = asyncio.Event()
        """Set whenever the journal or the connection changed (for health checks, tests)."""
        remote = s.remote
        if remote is None:
            return
        preset = logic.PRESETS[remote.preset]
        fields = logic.connect_fields(
            enterprise=node.enterprise,
            site=node.site,
            node_id=node.id,
            host=parse_broker_url(remote.url).host,
        )
        self.client_id = logic.fill(remote.client_id or logic.DEFAULT_CLIENT_ID, fields)
        fields["client_id"] = self.client_id
        username = remote.username or preset.username
        self.protocol: int = remote.protocol or preset.protocol
        self.remote_settings = BrokerSettings(
            url=remote.url,
            username=logic.fill(username, fields) if username else None,
            password=remote.password,
            password_file=remote.password_file,
            ca_file=remote.ca_file,
            cert_file=remote.cert_file,
            key_file=remote.key_file,
            keepalive_s=remote.keepalive_s,
        )
        self.router = logic.Router(
            preset,
            node_id=node.id,
            client_id=self.client_id,
            template=s.topic,
            retain=remote.retain,
            enterprise=node.enterprise,
            site=node.site,
        )
        self.link = remote.link if remote.link is not None else self.router.retain
        """The bridge's own birth and Last Will on the remote (`Remote.link`)."""
        self._link_bdseq = 0
        own = f"{node.enterprise}/{node.site}/_node/{node.id}"
        self._link_topics = (self.router.render(f"{own}/birth"), self.router.render(f"{own}/death"))
        # with the link, the remote hears of this node from it alone: the local birth and
        # death, replayed from the journal behind the link's, would contradict it
        exclude = [*s.exclude, f"{own}/#"] if self.link else s.exclude
        self.selector = logic.Selector(s.include, exclude)
        for i, topic_filter in enumerate(s.include):
            node.subscribe(topic_filter, msgspec.Raw, self._taker(i), qos=1)
        m = self.metrics
        m.journal_messages.set_function(lambda: self.journal.count if self.journal else 0)
        m.oldest_age.set_function(self._oldest_age)
        m.since_delivery.set_function(self._since_delivery)

    # ---- intake ----------------------------------------------------------------------

    def _taker(self, index: int) -> Callable[[Inbound[msgspec.Raw]], Awaitable[None]]:
        async def take(msg: Inbound[msgspec.Raw]) -> None:
            first = self.selector.first(msg.topic)
            if first != index:  # taken (and acknowledged) by an earlier include filter
                if first is None:  # or excluded: by nobody
                    msg.ack()
                return
            payload = bytes(msg.payload)
            try:
                self.router.check(msg.topic, len(payload))
            except logic.Unsendable as exc:
                self.metrics.drop(exc.reason)
                raise Reject(exc.reason, str(exc)) from None
            priority, flags = logic.classify(msg.topic)
            while len(self._intake) >= self.settings.queue_size:
                self._intake_space.clear()
                await self._intake_space.wait()
            item = Item(msg.topic, payload, priority, flags, _now_ms(), msg.redelivered)
            self._intake.append((item, msg.ack))
            self._intake_ready.set()

        return take

    async def _writer(self) -> None:
        """Group commit: everything that queued up during the previous commit goes next."""
        while True:
            if not self._intake:
                self._intake_ready.clear()
                await self._intake_ready.wait()
                continue
            await self._commit()

    async def _commit(self) -> None:
        journal = self.journal
        assert journal is not None
        n = min(len(self._intake), COMMIT_MAX)
        taken = [self._intake.popleft() for _ in range(n)]
        items = [item for item, _ in taken]
        self._intake_space.set()
        try:
            appended = await self._call(journal.append, items)
        except JournalFull as exc:
            for _, ack in taken:  # dropped (and counted): the broker must not resend them
                ack()
            self.metrics.drop("disk_full", len(items))
            self.changed.set()
            now = time.monotonic()
            if now - self._full_logged >= 10.0:
                self._full_logged = now
                log.error(
                    "%s: journal %s is full (%s): new messages are dropped (counted as"
                    ' uns_bridge_dropped_total{reason="disk_full"}); free disk space or'
                    " lower journal.max_bytes",
                    self.node.id,
                    journal.path,
                    exc,
                )
            return
        for _, ack in taken:  # committed: now the local broker may forget them, in order
            ack()
        if appended.duplicates:
            self.metrics.duplicates.inc(appended.duplicates)
        self.metrics.drop("cap_telemetry", appended.cap_telemetry)
        self.metrics.drop("cap_event", appended.cap_event)
        if appended.cap_telemetry or appended.cap_event:
            log.warning(
                "%s: journal at its cap (%d bytes): dropped %d telemetry and %d event messages,"
                " oldest first",
                self.node.id,
                journal.max_bytes,
                appended.cap_telemetry,
                appended.cap_event,
            )
        self._new_data.set()
        self.changed.set()

    # ---- forward ---------------------------------------------------------------------

    async def _remote_loop(self) -> None:
        remote = self.settings.remote
        assert remote is not None
        attempt = 0
        refusals = 0  # logins refused in a row: their own, much longer backoff
        while True:
            if self.sessions or attempt:
                self.metrics.reconnects.inc()
            self._check_certificate()
            started = time.monotonic()
            forwarded = self.forwarded
            sessions = self.sessions
            try:
                async with connect(
                    remote.url,
                    client_id=self.client_id,
                    settings=self.remote_settings,
                    timeout_s=remote.timeout_s,
                    protocol=5 if self.protocol == 5 else 4,
                    max_inflight=remote.inflight,
                    will=self._link_death("lost") if self.link else None,
                ) as bus:
                    self.sessions += 1
                    self.metrics.connected.set(1)
                    self.changed.set()
                    log.info(
                        "%s: connected to remote %s as %s; %d messages waiting",
                        self.node.id,
                        remote.url,
                        self.client_id,
                        self.journal.count if self.journal else 0,
                    )
                    try:
                        if self.link:
                            await self._link_birth(bus)
                        await self._forward(bus)
                    except asyncio.CancelledError:
                        if self.link:  # stopped: say so, rather than leave it to the will
                            await self._link_stopped(bus)
                        raise
                error = f"{remote.url} closed the connection"
            except BusError as exc:
                error = str(exc)
            except ConfigError as exc:  # the client certificate or key cannot be read
                error = str(exc).replace("broker.", "remote.")
            finally:
                self.metrics.connected.set(0)
                self.changed.set()
                self._link_bdseq = next_seq(self._link_bdseq)
            # a session that did something resets the backoff, one refused at once does not
            if self.forwarded > forwarded or (time.monotonic() - started > 30):
                attempt = 0
            cause = logic.explain(error)
            if self.sessions > sessions:
                refusals = 0
            elif logic.login_refused(error):
                delay = logic.backoff(refusals, remote.login_retry_min_s, remote.login_retry_max_s)
                refusals += 1
                self.metrics.login_refusals.inc()
                log.error(
                    "%s: remote %s refused our login (%s: %s); %d messages kept in the journal;"
                    " next attempt in %.1f s (remote.login_retry_min_s doubling to"
                    " remote.login_retry_max_s: retrying sooner could lock the account)",
                    self.node.id,
                    remote.url,
                    cause or "refused",
                    error,
                    self.journal.count if self.journal else 0,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            delay = logic.backoff(attempt, remote.reconnect_min_s, remote.reconnect_max_s)
            attempt += 1
            # a refused message blocks everything behind it until the remote's policy
            # changes: an error, with what to check when it is our own site that is refused
            clash = logic.refused_own_namespace(error, self.node.enterprise, self.node.site)
            log.log(
                logging.ERROR if clash else logging.WARNING,
                "%s: remote %s: %s%s; %d messages kept in the journal; retrying in %.1f s%s",
                self.node.id,
                remote.url,
                f"{cause}: " if cause else "",
                error,
                self.journal.count if self.journal else 0,
                delay,
                f" ({clash})" if clash else "",
            )
            await asyncio.sleep(delay)

    def _link_death(self, reason: str) -> Will:
        death = NodeDeath(ts=now_ms(), node=self.node.id, bdseq=self._link_bdseq, reason=reason)
        return Will(self._link_topics[1], encode(death), qos=1, retain=True)

    async def _link_birth(self, bus: Bus) -> None:
        """This session's birth on the remote, before anything from the journal: the last
        session's death cleared (zero bytes retained), then the birth naming the site it
        relays, with the bdseq of this connection's will."""
        birth = NodeBirth(
            ts=now_ms(),
            node=self.node.id,
            service=self.name,
            version=self.node.version,
            bdseq=self._link_bdseq,
            host=socket.gethostname(),
            relays=[f"{self.node.enterprise}/{self.node.site}"],
        )
        await bus.publish(self._link_topics[1], b"", qos=1, retain=True)
        await bus.publish(self._link_topics[0], encode(birth), qos=1, retain=True)

    async def _link_stopped(self, bus: Bus) -> None:
        will = self._link_death("shutdown")
        with contextlib.suppress(BusError, TimeoutError):
            async with asyncio.timeout(2.0):
                await bus.publish(will.topic, will.payload, qos=1, retain=True)

    async def _forward(self, bus: Bus) -> None:
        """One session: send from the oldest row on, until the connection fails."""
        await self._flush_acks()  # acknowledged rows must not be sent again
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tasks: set[asyncio.Task[None]] = set()

        def on_done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if task.cancelled() or failed.done():
                return
            exc = task.exception()
            failed.set_exception(exc or BusError("the remote connection ended"))

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(on_done)

        def on_published(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None and not failed.done():
                failed.set_exception(task.exception())  # type: ignore[arg-type]

        def publish(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(on_published)

        spawn(self._watch(bus))
        spawn(self._send(bus, publish))
        try:
            await failed
        finally:
            pending = list(tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _watch(self, bus: Bus) -> None:
        """Ends (with BusError) when the connection drops: we subscribe to nothing."""
        async for _message in bus.messages():
            pass

    async def _send(self, bus: Bus, publish: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        s = self.settings.journal
        remote = self.settings.remote
        journal = self.journal
        assert remote is not None and journal is not None
        window = asyncio.Semaphore(remote.inflight)
        rate = logic.backfill_rate(s.backfill_rate, logic.PRESETS[remote.preset], s.batch)
        bucket = logic.TokenBucket(rate, max(s.batch, rate / 10), time.monotonic)
        cursor = 0
        while True:
            rows = await self._call(journal.read, cursor, READ_CHUNK)
            if not rows:
                self._new_data.clear()  # cleared before the second look: no lost wake-up
                rows = await self._call(journal.read, cursor, READ_CHUNK)
                if not rows:
                    await self._new_data.wait()
                    continue
            if s.batch > 1 and s.batch_ms and len(rows) < s.batch:
                await asyncio.sleep(s.batch_ms / 1000)  # live data: let the batch fill
                rows = await self._call(journal.read, cursor, READ_CHUNK)
            for group in self.router.group(rows, s.batch):
                delay = bucket.delay(len(group))
                if delay > 0:
                    await asyncio.sleep(delay)
                await window.acquire()
                publish(self._publish(bus, group, window))
                cursor = group[-1].id

    async def _publish(self, bus: Bus, group: list[Row], window: asyncio.Semaphore) -> None:
        try:
            out = self.router.outbound(group)
            await bus.publish(
                out.topic,
                out.payload,
                qos=1,
                retain=out.retain,
                user_properties=out.user_properties,
            )
        finally:
            window.release()
        self._acked.extend(out.ids)
        if len(self._acked) >= ACK_FLUSH_N:
            self._ack_due.set()
        self.metrics.forwarded.inc(len(out.ids))
        self.forwarded += len(out.ids)
        self._last_delivery_ms = _now_ms()

    async def _ack_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._ack_due.wait(), ACK_FLUSH_S)
            except TimeoutError:
                pass
            self._ack_due.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        async with self._ack_lock:
            if not self._acked or self.journal is None:
                return
            ids = list(self._acked)
            try:
                await self._call(self.journal.delete, ids)
            except JournalFull as exc:  # deleting needs a little room in the WAL
                log.error("%s: cannot delete delivered messages: %s", self.node.id, exc)
                return
            del self._acked[: len(ids)]  # only appended to meanwhile
            self.changed.set()

    # ---- housekeeping ----------------------------------------------------------------

    async def _housekeeping(self) -> None:
        s = self.settings.journal
        journal = self.journal
        assert journal is not None
        last_cert = time.monotonic()
        while True:
            expired = await self._call(journal.expire, s.ttl_s)
            if expired:
                self.changed.set()
                self.metrics.expired.inc(expired)
                self.metrics.drop("expired", expired)
                log.warning(
                    "%s: %d messages older than journal.ttl_s=%d s dropped undelivered",
                    self.node.id,
                    expired,
                    s.ttl_s,
                )
            try:
                await self._call(_reclaim, journal)
            except JournalFull:
                pass  # the next writes say it loudly
            self.metrics.journal_bytes.set(await self._call(journal.disk_bytes))
            if time.monotonic() - last_cert > 3600:
                last_cert = time.monotonic()
                self._check_certificate()
            await asyncio.sleep(1.0)

    def _check_certificate(self) -> None:
        remote = self.settings.remote
        if remote is None or remote.cert_file is None:
            return
        try:
            days = logic.cert_days_left(Path(remote.cert_file).read_bytes())
        except (OSError, ValueError):
            return  # the connection attempt says why it cannot use it
        self.metrics.cert_days_left.labels().set(days)
        now = time.monotonic()
        if days >= 14 or now - self._cert_warned < 3600:
            return
        self._cert_warned = now
        if days < 0:
            log.error(
                "%s: the client certificate %s expired %.0f days ago",
                self.node.id,
                remote.cert_file,
                -days,
            )
        else:
            log.warning(
                "%s: the client certificate %s expires in %.1f days",
                self.node.id,
                remote.cert_file,
                days,
            )

    def _oldest_age(self) -> float:
        j = self.journal
        if j is None or not j.count or j.oldest_ts_ms is None:
            return 0.0
        return max(0.0, (_now_ms() - j.oldest_ts_ms) / 1000)

    def _since_delivery(self) -> float:
        j = self.journal
        if j is None or not j.count or j.oldest_ts_ms is None:
            return 0.0
        waiting_since = max(self._last_delivery_ms, j.oldest_ts_ms)
        return max(0.0, (_now_ms() - waiting_since) / 1000)

    # ---- the service -----------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        if s.remote is None:
            log.info("%s: no remote configured; the bridge is idle", self.node.id)
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.node.id}-journal")
        try:
            self.journal = await self._call(self._open_journal)
            self.changed.set()
            log.info(
                "%s: journal %s: %d messages waiting; forwarding %s to %s (%s)",
                self.node.id,
                self.journal.path,
                self.journal.count,
                ", ".join(s.include),
                s.remote.url,
                s.remote.preset,
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer())
                tg.create_task(self._ack_loop())
                tg.create_task(self._housekeeping())
                tg.create_task(self._remote_loop())
        finally:
            await self._close()

    async def _close(self) -> None:
        """Commit what was taken, forget what was delivered, close the file."""
        if self.journal is not None:
            while self._intake:
                await self._commit()
            await self._flush_acks()
            await self._call(self.journal.close)
            self.journal = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _open_journal(self) -> Journal:
        s = self.settings.journal
        path = Path(s.path)
        try:
            return Journal(path, max_bytes=s.max_bytes, synchronous=s.synchronous)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # cannot open or write it at all
                hint = " (another bridge uses it?)" if "locked" in str(exc) else ""
                raise ConfigError(
                    f"services.bridge.journal.path: cannot use {path}: {exc}{hint}"
                ) from None
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error(
                "%s: journal %s is damaged (%s); moved aside to %s, starting a new one",
                self.node.id,
                path,
                exc,
                aside,
            )
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(f"{path}{suffix}"):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            return Journal(path, max_bytes=s.max_bytes, synchronous=s.synchronous)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a journal call on the journal's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


def _reclaim(journal: Journal) -> None:
    """Give disk space back once the backlog is gone, or when over a third of the file is
    free pages (at the cap, freed pages are reused by new messages instead)."""
    free = journal.free_bytes()
    if free and (journal.count == 0 or free > max(8 * 2**20, journal.used_bytes() // 2)):
        journal.reclaim(4096)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
