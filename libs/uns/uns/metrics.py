"""The standard metric set every service exposes, one registry per service node.

Names carry the ``uns_`` prefix and a unit suffix; labels are low-cardinality
(service, stream, reason), never a full topic. A service declares its own metrics
through the node's (``node.metrics.counter(...)``, ``gauge``, ``histogram``): on its
registry, the ``service`` label built in and bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Final, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from uns.topics import NODE_LEVEL, STREAMS

log = logging.getLogger(__name__)

_STREAMS: Final = frozenset(STREAMS)

M = TypeVar("M", Counter, Gauge, Histogram)


class Family(Generic[M]):
    """One metric of a service with its ``service`` label bound: ``labels`` takes the rest.

    ``labels(...)`` returns the child to ``inc``/``set``/``observe``, as prometheus_client's
    own does; a metric with no label but ``service`` is ``labels()``. A series exists from
    its first ``labels(...)``: the declaration's ``zeros`` export some at zero from the start
    (so rates and alerts work before the first event); a gauge that means nothing until set
    (a certificate's days left) is left to its first ``set``.
    """

    __slots__ = ("metric", "service")
    metric: M
    """The prometheus_client metric itself, its first label ``service``."""
    service: str

    def __init__(self, metric: M, service: str) -> None:
        self.metric = metric
        self.service = service

    def labels(self, *values: str) -> M:
        return self.metric.labels(self.service, *values)

    def remove(self, *values: str) -> None:
        """Stop exporting one series (a model replaced, a key rotated)."""
        self.metric.remove(self.service, *values)


def stream_label(topic: str) -> str:
    """``raw``/``features``/... for device topics, ``node`` for nodes, else ``other``."""
    levels = topic.split("/")
    if len(levels) == 8 and levels[6] in _STREAMS:
        return levels[6]
    if len(levels) == 5 and levels[2] == NODE_LEVEL:
        return "node"
    return "other"


class ServiceMetrics:
    """Counters, gauges and histograms of one service process."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_start_time_seconds (a restart is a change of it: the restart alerts),
        # memory, CPU and open files, on Linux; nothing elsewhere.
        ProcessCollector(registry=r)
        self.received = Counter(
            "uns_messages_received_total",
            "Messages received from the broker",
            ["service", "stream"],
            registry=r,
        )
        self.published = Counter(
            "uns_messages_published_total",
            "Messages published to the broker",
            ["service", "stream"],
            registry=r,
        )
        self.dropped = Counter(
            "uns_messages_dropped_total",
            "Messages dropped, by reason (decode, overflow, offline, rejected, ...)",
            ["service", "reason"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "uns_handler_duration_seconds",
            "Time spent in message handlers",
            ["service"],
            registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.reconnects = Counter(
            "uns_reconnects_total",
            "Connection attempts to the broker after the first",
            ["service"],
            registry=r,
        )
        self.connected = Gauge(
            "uns_connected", "1 while connected to the broker", ["service"], registry=r
        )
        self.queue_depth = Gauge(
            "uns_queue_depth_messages",
            "Messages waiting in a bounded queue",
            ["service", "queue"],
            registry=r,
        )
        self.births = Counter(
            "uns_births_published_total",
            "Node and device births published (incl. rebirths)",
            ["service"],
            registry=r,
        )
        self.handler_errors = Counter(
            "uns_handler_errors_total",
            "Messages a handler failed on with an unexpected exception (a bug: see the log);"
            ' each is also a drop with reason="error"',
            ["service"],
            registry=r,
        )
        self.newer_version = Counter(
            "uns_messages_newer_version_total",
            "Messages of a schema version newer than this service's, handled by the"
            " forward-compatibility rules (unknown fields ignored)",
            ["service"],
            registry=r,
        )

        # Export zeros from the start, so rates and alerts work before the first event.
        for metric in (
            self.reconnects,
            self.connected,
            self.handler_seconds,
            self.births,
            self.handler_errors,
            self.newer_version,
        ):
            metric.labels(service)
        for reason in ("decode", "overflow", "offline", "error"):
            self.dropped.labels(service, reason)

    # ---- a service's own metrics -------------------------------------------------------------

    def counter(
        self, name: str, doc: str, labels: Sequence[str] = (), *, zeros: Iterable[Any] = ()
    ) -> Family[Counter]:
        """A counter ``name`` of this service, by ``labels`` besides ``service``.

        ``zeros``: the label values (a string for one label, a tuple for several) whose
        series are exported at zero from the start."""
        return self._family(Counter(name, doc, ["service", *labels], registry=self.registry), zeros)

    def gauge(
        self, name: str, doc: str, labels: Sequence[str] = (), *, zeros: Iterable[Any] = ()
    ) -> Family[Gauge]:
        """A gauge ``name`` of this service (see ``counter``)."""
        return self._family(Gauge(name, doc, ["service", *labels], registry=self.registry), zeros)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
        zeros: Iterable[Any] = (),
    ) -> Family[Histogram]:
        """A histogram ``name`` of this service (see ``counter``), with its ``buckets``."""
        metric = Histogram(name, doc, ["service", *labels], registry=self.registry, buckets=buckets)
        return self._family(metric, zeros)

    def _family(self, metric: M, zeros: Iterable[Any]) -> Family[M]:
        family = Family(metric, self.service)
        for values in zeros:
            family.labels(*((values,) if isinstance(values, str) else values))
        return family

    # ---- the runtime's own ---------------------------------------------------------------------

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped.labels(self.service, reason).inc(n)

    def count(self, name: str, **labels: str) -> float:
        """Current value of one of this service's series (for health checks and tests)."""
        value = self.registry.get_sample_value(name, {"service": self.service, **labels})
        return value or 0.0

    def dropped_count(self, reason: str) -> float:
        """Current value of the dropped counter for ``reason`` (for health checks and tests)."""
        value = self.registry.get_sample_value(
            "uns_messages_dropped_total", {"service": self.service, "reason": reason}
        )
        return value or 0.0

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on a thread; return the bound port."""
        self._server: Any
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None
