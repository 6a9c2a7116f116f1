"""amqtt 0.12.1 (the newest release) with three of its races worked around.

Each was met under ``uns up`` and has a regression test (tests/integration/
test_broker_races.py); each fix is local to this subclass, so a newer amqtt that fixes
them upstream keeps working (the overridden methods keep their signatures).

1. ``dictionary changed size during iteration`` (amqtt/broker.py:601). When a client
   connects, amqtt iterates the live dict of *every* client's subscription filters and
   awaits inside the loop (sending retained messages); a subscription made meanwhile by
   another client (all of them do that when they reconnect after a broker restart)
   raises. The connection's task dies after the CONNACK but before its message loop
   starts: the client's SUBSCRIBE is never answered (the client waits for its timeout,
   10 s) and what it publishes is acknowledged but never routed. Fix: the subscriptions
   dict iterates over a snapshot (`_Subscriptions`).
2. The same loop sends a *new* client the retained messages of other clients' filters,
   which it never subscribed to (an MQTT 3.1.1 violation a third-party app sees).
   Retained messages now go out only on a SUBSCRIBE, as MQTT says.
3. A client's last messages are lost at a disconnect: amqtt acknowledges a QoS 1
   PUBLISH once it is queued for routing, but when the DISCONNECT (or the socket's
   close) is handled, the loop stops and what is still queued is dropped, after the
   client was told it was delivered (a row missing at the end of ``uns replay``). Fix:
   the disconnect waits (at most `DRAIN_S`) until the client's queue has been routed;
   a Last Will so also follows the client's last data, not precedes it.
4. Its ACL plugin compares a requested filter with an allowed one level by level, a
   ``#`` as one level: ``+/+/+/+/+/+/features/#`` was granted under ``+/+/+/+/+/+/+/+``
   (and would deliver ``.../features/a/b``). Fix: `TopicAcl` grants a filter only when
   every topic it matches, the allowed one matches (`uns.scope.within`), as Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from typing import Any, Final

from amqtt.broker import Broker
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from uns.scope import within

DRAIN_S: Final = 5.0
"""How long a disconnect waits for the client's acknowledged messages to be routed."""

_connecting: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "uns_broker_connecting", default=False
)


class _Subscriptions(dict[str, list[tuple[Any, int]]]):
    """amqtt's filter -> subscribers map, iterated over a copy: amqtt awaits inside loops
    over it while other connections add and remove filters."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[tuple[Any, int]]]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]


class _RoutingQueue(asyncio.Queue[Any]):
    """A session's queue of received messages to route, which says when it is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.emptied = asyncio.Event()
        self.emptied.set()

    def _put(self, item: Any) -> None:
        super()._put(item)  # type: ignore[misc]
        self.emptied.clear()

    def _get(self) -> Any:
        item = super()._get()  # type: ignore[misc]
        if self.empty():
            self.emptied.set()
        return item


class PatchedBroker(Broker):  # type: ignore[misc]
    """`amqtt.broker.Broker` with the races above worked around."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Subscriptions()

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Any,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        _connecting.set(True)  # until its message loop starts (this task's context only)
        queue = _RoutingQueue()
        while not client_session.delivered_message_queue.empty():  # a resumed session's
            queue.put_nowait(client_session.delivered_message_queue.get_nowait())
        client_session.delivered_message_queue = queue
        _route_before_disconnect(handler, queue)
        await super()._handle_client_session(
            reader, writer, client_session, handler, server, listener_name
        )

    async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
        _connecting.set(False)
        await super()._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        if _connecting.get():
            return  # amqtt's loop over every client's filters at connect (see 2. above)
        await super()._publish_retained_messages_for_subscription(subscription, session)


def _route_before_disconnect(handler: Any, queue: _RoutingQueue) -> None:
    """Make ``handler`` report a disconnect only once ``queue``, its session's messages to
    route, is empty (the broker's loop for the client keeps routing until then)."""
    report = handler.handle_disconnect
    in_order = asyncio.Lock()  # FIFO: a DISCONNECT is reported before the socket's close
    goodbye: list[Any] = []

    async def handle_disconnect(disconnect: Any) -> None:
        if disconnect is not None:
            # kept: the reader cancels this task when the socket closes right after, and
            # the close must then still count as a clean DISCONNECT (no Last Will)
            goodbye.append(disconnect)
        try:
            async with in_order:
                try:
                    await asyncio.wait_for(queue.emptied.wait(), DRAIN_S)
                except TimeoutError:
                    pass  # its message loop is gone: nothing will route them
        except asyncio.CancelledError:
            if disconnect is not None:
                raise  # the DISCONNECT's task, cancelled by the reader, which reports it
            # The reader itself (the socket closed), stopped by the broker while it waits
            # here: amqtt waits for the reader to finish this call, so it must not raise.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        await report(goodbye[0] if goodbye else disconnect)

    handler.handle_disconnect = handle_disconnect


class TopicAcl(TopicAccessControlListPlugin):  # type: ignore[misc]
    """amqtt's ACL plugin, with a requested filter checked to lie within an allowed one
    (4. above); a topic published is matched as before."""

    @staticmethod
    def topic_ac(topic_requested: str, topic_allowed: str) -> bool:
        return within(topic_requested, topic_allowed)
