"""``uns run notifier``: anomaly events -> work orders on a webhook, one per fault.

* intake: ``{site}/+/+/+/+/events/{kind}`` at QoS 1 on a persistent session (client id =
  node id, like the bridge): what is raised or cleared while the notifier is down is
  queued by the broker. An event is acknowledged only once the operations it makes are
  committed to the journal and the state file is written, so a ``kill -9`` at any point
  gets it again; decided again from the same state it makes the same operations, which
  the journal recognises (a re-delivery) or the sender skips (`Order.sent`).
* correlation (`uns_notifier.correlate`): one work order per event id; raises of
  ``correlate_min`` devices of one line within ``correlate_s``: one line incident.
* delivery: the journal (`uns.journal`, the bridge's) is read in order, one operation at
  a time (an update never overtakes its open); an operation leaves it once the webhook
  answered 2xx (its record id is written to the state file first) or refused it for
  good (4xx other than 401/403/408/429: counted as a dead letter, the answer logged);
  429/5xx/connection errors back off (``Retry-After`` honoured) and send it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import msgspec

from uns import Event, Inbound, Node, Service, now_ms
from uns.errors import ConfigError
from uns.journal import EVENT, Item, Journal, JournalFull, Row
from uns_notifier import webhook as wh
from uns_notifier.correlate import SEVERITY_RANK, Correlator, Op, Order, State
from uns_notifier.settings import NotifierSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

DEAD_REASONS: Final = ("http_4xx", "order_refused", "undecodable")
RETRY_REASONS: Final = ("http_429", "http_5xx", "http_auth", "connect", "timeout", "auth_file")
ACTIONS: Final = ("open", "update", "resolve")
BODY_LOGGED: Final = 500
"""Characters of a refusing answer's body logged with its dead letter."""


class NotifierMetrics:
    def __init__(self, node: Node[NotifierSettings]) -> None:
        m = node.metrics
        self.work_orders = m.counter(
            "uns_notifier_work_orders_total",
            "Work orders opened: kind=device (one fault), line (a storm's one incident)",
            ["kind"],
            zeros=("device", "line"),
        )
        self.correlated = m.counter(
            "uns_notifier_correlated_total",
            "Device events attached to a line incident instead of opening their own",
        ).labels()
        self.delivered = m.counter(
            "uns_notifier_delivered_total",
            "Operations the webhook accepted (2xx)",
            ["action"],
            zeros=ACTIONS,
        )
        self.dead = m.counter(
            "uns_notifier_dead_letters_total",
            "Operations dropped undelivered: http_4xx (refused, the answer logged),"
            " order_refused (its work order's open was refused), undecodable",
            ["reason"],
            zeros=DEAD_REASONS,
        )
        self.retries = m.counter(
            "uns_notifier_retries_total",
            "Deliveries that failed and are sent again after a back-off",
            ["reason"],
            zeros=RETRY_REASONS,
        )
        self.duplicates = m.counter(
            "uns_notifier_duplicates_total",
            "Events seen again (re-delivered) and operations journaled twice: not sent again",
        ).labels()
        self.dropped = m.counter(
            "uns_notifier_dropped_total",
            "Operations lost: expired (older than journal.ttl_s), disk_full",
            ["reason"],
            zeros=("expired", "disk_full"),
        )
        self.journal_messages = m.gauge(
            "uns_notifier_journal_messages", "Operations waiting for the webhook"
        ).labels()
        self.oldest_age = m.gauge(
            "uns_notifier_oldest_age_seconds", "Age of the oldest operation waiting"
        ).labels()
        self.open_orders = m.gauge(
            "uns_notifier_open_work_orders", "Work orders open (not yet resolved)"
        ).labels()
        self.webhook_up = m.gauge(
            "uns_notifier_webhook_up", "1 when the last request reached the webhook"
        ).labels()


class Notifier(Service[NotifierSettings]):
    """One work order per fault on a webhook; see the package docstring."""

    name = "notifier"
    Settings = NotifierSettings
    persistent_session = True
    """Events raised or cleared while it is down are queued for it by the broker."""

    clock: Callable[[], int] = staticmethod(now_ms)
    """Wall clock (ms) of the storm windows and the journal's TTL (tests may advance it)."""

    def __init__(self, node: Node[NotifierSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.metrics = NotifierMetrics(node)
        self.state_path = Path(s.state_file)
        self.state = self._load_state()
        self.correlator = Correlator(self.state, s.correlate_s, s.correlate_min)
        self.journal: Journal | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._new = asyncio.Event()
        self.changed = asyncio.Event()
        """Set whenever something was delivered or dead-lettered (tests, health checks)."""
        m = self.metrics
        m.journal_messages.set_function(lambda: self.journal.count if self.journal else 0)
        m.oldest_age.set_function(self._oldest_age)
        m.open_orders.set_function(
            lambda: sum(o.status == "open" for o in self.state.orders.values())
        )
        m.webhook_up.set(0)
        if s.webhook is None:
            return
        for topic_filter in s.filters(node.config):
            node.subscribe(topic_filter, Event, self.on_event, qos=1)

    # ---- state ---------------------------------------------------------------------------

    def _load_state(self) -> State:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise ConfigError(f"services.notifier.state_file: cannot read it: {exc}") from None
        try:
            state = msgspec.json.decode(data, type=State)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self.state_path.with_name(f"{self.state_path.name}.corrupt-{int(time.time())}")
            os.replace(self.state_path, aside)
            log.error(
                "%s is not a notifier state file (%s): moved aside to %s, starting without"
                " (events delivered again may open their work orders again)",
                self.state_path,
                exc,
                aside,
            )
            return State()
        log.info(
            "%s: %d work orders known (%d open), %d raises held",
            self.state_path,
            len(state.orders),
            sum(o.status == "open" for o in state.orders.values()),
            sum(len(h.members) for h in state.held.values()),
        )
        return state

    def _write_state(self, data: bytes) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    async def _save(self) -> None:
        data = msgspec.json.encode(self.state)  # taken now, on the loop; written in order
        async with self._save_lock:
            await self._call(self._write_state, data)

    # ---- intake --------------------------------------------------------------------------

    async def on_event(self, msg: Inbound[Event]) -> None:
        event = msg.payload
        if SEVERITY_RANK.get(event.severity, 0) < SEVERITY_RANK[self.settings.min_severity]:
            msg.ack()
            return
        await self._ready.wait()
        async with self._lock:
            known = event.id in self.state.events
            ops = self.correlator.on_event(event, self.clock())
            if not ops and known:
                self.metrics.duplicates.inc()
            await self._commit(ops, msg.redelivered)
            await self._save()  # the held raises too: kept before the broker forgets them
        msg.ack()

    async def _tick(self) -> None:
        """Ends the storm windows that are due, forgets old work orders, expires."""
        s = self.settings
        step = min(1.0, s.correlate_s / 4) if s.correlate_s else 1.0
        last_prune = 0.0
        while True:
            now = self.clock()
            due = self.correlator.next_due_ms()
            if due is not None and due <= now:
                async with self._lock:
                    ops = self.correlator.due(self.clock())
                    await self._commit(ops, False)
                    await self._save()
            if time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                await self._housekeeping(now)
            await asyncio.sleep(step)

    async def _housekeeping(self, now: int) -> None:
        s = self.settings
        assert self.journal is not None
        expired = await self._call(self.journal.expire, s.journal.ttl_s, now)
        if expired:
            self.metrics.dropped.labels("expired").inc(expired)
            log.error(
                "%s: %d work-order operations older than journal.ttl_s=%d s dropped undelivered",
                self.node.id,
                expired,
                s.journal.ttl_s,
            )
        async with self._lock:
            if self.correlator.prune(now, s.keep_s * 1000):
                await self._save()

    async def _commit(self, ops: list[Op], redelivered: bool) -> None:
        if not ops:
            return
        assert self.journal is not None
        now = self.clock()
        items = [Item(op.key, msgspec.json.encode(op), EVENT, 0, now, redelivered) for op in ops]
        try:
            appended = await self._call(self.journal.append, items)
        except JournalFull as exc:
            self.metrics.dropped.labels("disk_full").inc(len(items))
            log.error("%s: journal full (%s): %d operations lost", self.node.id, exc, len(items))
            return
        if appended.duplicates:
            self.metrics.duplicates.inc(appended.duplicates)
        for op in ops:
            if op.action == "open":
                self.metrics.work_orders.labels(op.kind).inc()
                log.info(
                    "%s: %s work order %s for %s (%d events)",
                    self.node.id,
                    op.kind,
                    op.key,
                    op.path,
                    len(op.members),
                )
            elif op.kind == "line" and op.cause is not None and op.cause.state != "cleared":
                self.metrics.correlated.inc()
        self._new.set()

    # ---- delivery ------------------------------------------------------------------------

    async def _sender(self, client: httpx.AsyncClient) -> None:
        journal = self.journal
        assert journal is not None
        cursor = 0
        while True:
            rows = await self._call(journal.read, cursor, 100)
            if not rows:
                self._new.clear()  # cleared before the second look: no lost wake-up
                rows = await self._call(journal.read, cursor, 100)
                if not rows:
                    await self._new.wait()
                    continue
            for row in rows:
                await self._deliver(client, row)
                cursor = row.id
                await self._call(journal.delete, [row.id])
                self.changed.set()

    async def _deliver(self, client: httpx.AsyncClient, row: Row) -> None:
        try:
            op = msgspec.json.decode(row.payload, type=Op)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.metrics.dead.labels("undecodable").inc()
            log.error(
                "%s: journal row %d is not an operation (%s): dropped", self.node.id, row.id, exc
            )
            return
        order = self.state.orders.get(op.key)
        if order is not None and op.n < order.sent:
            self.metrics.duplicates.inc()
            return
        if order is not None and order.refused and op.n > 0:
            self.metrics.dead.labels("order_refused").inc()
            await self._done(order, op, None)
            return
        attempt = 0
        failing_since: float | None = None
        while True:
            try:
                verdict, ref, answer = await self._attempt(client, op, order)
            except _Retry as retry:
                self.metrics.webhook_up.set(0 if retry.reason in ("connect", "timeout") else 1)
                self.metrics.retries.labels(retry.reason).inc()
                s = self.settings.webhook
                assert s is not None
                delay = retry.after
                if delay is None:
                    delay = min(s.retry_max_s, s.retry_min_s * 2 ** min(attempt, 30))
                    delay *= random.uniform(0.5, 1.0)
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "%s: webhook: %s; %s of %s kept in the journal, sending again in %.1f s"
                        " (and on, backing off)",
                        self.node.id,
                        retry.detail,
                        op.action,
                        op.key,
                        delay,
                    )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.metrics.webhook_up.set(1)
            if failing_since is not None:
                log.info(
                    "%s: webhook back after %.1f s and %d attempts; %s of %s delivered",
                    self.node.id,
                    time.monotonic() - failing_since,
                    attempt,
                    op.action,
                    op.key,
                )
            if verdict == "ok":
                self.metrics.delivered.labels(op.action).inc()
            else:
                self.metrics.dead.labels("http_4xx").inc()
                log.error(
                    "%s: webhook refused %s of work order %s for good: %s; dead letter (counted"
                    " as uns_notifier_dead_letters_total), delivery goes on",
                    self.node.id,
                    op.action,
                    op.key,
                    answer,
                )
            await self._done(order, op, ref, refused=verdict != "ok" and op.n == 0)
            return

    async def _done(
        self, order: Order | None, op: Op, ref: str | None, refused: bool = False
    ) -> None:
        """The operation is delivered or dead: the state file says so before the journal
        forgets it."""
        if order is None:
            return  # forgotten (pruned) meanwhile
        order.sent = max(order.sent, op.n + 1)
        if ref is not None:
            order.ref = ref
        if refused:
            order.refused = True
        await self._save()

    async def _attempt(
        self, client: httpx.AsyncClient, op: Op, order: Order | None
    ) -> tuple[wh.Verdict, str | None, str]:
        s = self.settings.webhook
        assert s is not None
        ref = order.ref if order is not None else None
        if s.preset == "servicenow" and (op.action == "open" or ref is None):
            found = await self._request(client, wh.lookup(s, op.key))
            if found[0] == "ok":
                ref = wh.sys_id(found[2]) or ref
                if ref is not None and op.action == "open":
                    return "ok", ref, "found by correlation_id"
        request = wh.build(s, op, ref, self.node.id)
        if request is None:
            return "dead", None, "no incident to update (its sys_id is not known)"
        verdict, status, answer, text = await self._request(client, request)
        if verdict == "ok" and op.action == "open" and s.preset == "servicenow":
            ref = wh.sys_id(answer)
        return verdict, ref, f"HTTP {status}: {text[:BODY_LOGGED]}"

    async def _request(
        self, client: httpx.AsyncClient, request: wh.Request
    ) -> tuple[wh.Verdict, int, Any, str]:
        s = self.settings.webhook
        assert s is not None
        headers = {"Accept": "application/json"}
        if request.idempotency_key is not None:
            headers["Idempotency-Key"] = request.idempotency_key
        if s.auth_file is not None:
            try:
                secret = await asyncio.to_thread(Path(s.auth_file).read_text)
                headers[s.auth_header] = secret.strip()
            except OSError as exc:
                raise _Retry("auth_file", f"cannot read auth_file {s.auth_file}: {exc}") from None
        try:
            response = await client.request(
                request.method, request.url, json=request.body, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise _Retry(
                "timeout", f"{request.method} {request.url}: timed out ({exc!r})"
            ) from None
        except httpx.HTTPError as exc:  # refused, reset, TLS, DNS
            raise _Retry("connect", f"{request.method} {request.url}: {exc!r}") from None
        verdict = wh.verdict(response.status_code)
        text = response.text
        if verdict == "retry":
            code = response.status_code
            reason = (
                "http_429" if code == 429 else "http_auth" if code in (401, 403) else "http_5xx"
            )
            raise _Retry(
                reason,
                f"{request.method} {request.url}: HTTP {code} {text[:200]!r}",
                wh.retry_after(response.headers.get("Retry-After")),
            )
        try:
            answer = response.json() if text else None
        except ValueError:
            answer = None
        return verdict, response.status_code, answer, text

    # ---- the service ---------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        if s.webhook is None:
            log.info("%s: no webhook configured (services.notifier.webhook); idle", self.node.id)
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.node.id}-journal")
        try:
            self.journal = await self._call(self._open_journal)
            log.info(
                "%s: journal %s: %d operations waiting; work orders to %s (%s)",
                self.node.id,
                self.journal.path,
                self.journal.count,
                s.webhook.url,
                s.webhook.preset,
            )
            self._ready.set()
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=s.webhook.ca_file)
            timeout = httpx.Timeout(s.webhook.timeout_s)
            async with (
                httpx.AsyncClient(verify=verify, timeout=timeout) as client,
                asyncio.TaskGroup() as tg,
            ):
                tg.create_task(self._sender(client))
                tg.create_task(self._tick())
        finally:
            if self.journal is not None:
                await self._call(self.journal.close)
                self.journal = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _open_journal(self) -> Journal:
        j = self.settings.journal
        try:
            return Journal(j.path, max_bytes=j.max_bytes, synchronous=j.synchronous)
        except sqlite3.DatabaseError as exc:
            hint = " (another notifier uses it?)" if "locked" in str(exc) else ""
            raise ConfigError(
                f"services.notifier.journal.path: cannot use {j.path}: {exc}{hint}"
            ) from None

    def _oldest_age(self) -> float:
        j = self.journal
        if j is None or not j.count or j.oldest_ts_ms is None:
            return 0.0
        return max(0.0, (now_ms() - j.oldest_ts_ms) / 1000)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """A journal or state-file call, on their own thread (one at a time, in order)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, after: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.after = reason, detail, after
