"""Settings of ``services.notifier``: light (uns and the package's pure logic only)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec

from uns import ServiceSettings
from uns.config import PositiveFloat, Slug, Strict, UnsConfig
from uns.scope import Scope

PresetName = Literal["generic", "servicenow"]


class Webhook(Strict, frozen=True):
    """Where work orders go: one HTTPS endpoint, JSON, dialled out (never listened on)."""

    url: str
    """generic: the endpoint every operation is POSTed to; servicenow: the instance,
    ``https://acme.service-now.com`` (``table`` is appended)."""
    preset: PresetName = "generic"
    table: str = "/api/now/table/incident"
    """servicenow: the table API path; a work order is one record of it."""
    auth_header: str = "Authorization"
    """The header that carries the credential read from ``auth_file``."""
    auth_file: str | None = None
    """A file holding the header's whole value (``Bearer …``, ``Basic …``), read at every
    request so that a rotated secret needs no restart; no credential when absent."""
    ca_file: str | None = None
    """CA bundle that signed the endpoint's certificate; the system store when absent.
    The certificate and host name are always verified."""
    allow_plaintext: bool = False
    """Accept ``http://``: for a test server on the same machine only."""
    timeout_s: PositiveFloat = 10.0
    """Per request (connect, read); past it the request counts as failed and is retried."""
    retry_min_s: PositiveFloat = 1.0
    retry_max_s: PositiveFloat = 300.0
    """Back-off after a 429, a 5xx or a connection error: doubling from ``retry_min_s``
    with jitter, up to this; a ``Retry-After`` of the response is honoured (to 1 h)."""
    fields: dict[str, str] = {}
    """Constant fields added to every created work order (servicenow: ``assignment_group``,
    ``category``, ``caller_id``…; generic: merged into the payload's ``fields``)."""
    resolved_state: str = "6"
    """servicenow: the incident state set when the fault clears (6 = Resolved)."""
    close_code: str = "Closed/Resolved by Caller"
    """servicenow: the close code of a resolved incident."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"url: {self.url!r} is not an http(s) URL")
        if parts.scheme == "http" and not self.allow_plaintext:
            raise ValueError(
                f"url: {self.url!r} is not encrypted; use https:// (or set allow_plaintext:"
                " true for a local test server)"
            )
        if not self.table.startswith("/"):
            raise ValueError(f"table: {self.table!r} must start with /")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s is below retry_min_s")
        if not self.auth_header or any(c in self.auth_header for c in ":\r\n "):
            raise ValueError(f"auth_header: {self.auth_header!r} is not a header name")


class JournalSettings(Strict, frozen=True):
    """The durable queue of operations for the webhook (the bridge's journal, uns.journal)."""

    path: str = "var/notifier-journal.sqlite"
    ttl_s: Annotated[int, msgspec.Meta(ge=60)] = 7 * 86_400
    """An operation the webhook has not accepted within this is dropped (counted)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 64 * 1024 * 1024
    synchronous: Literal["full", "normal"] = "full"


class NotifierSettings(ServiceSettings, frozen=True):
    """``services.notifier``: off by default (it needs a webhook)."""

    default_metrics_port: ClassVar[int] = 9410

    enabled: bool = False
    webhook: Webhook | None = None
    """Without it the notifier idles (``uns run`` may start it harmlessly)."""
    kinds: list[Slug] = msgspec.field(default_factory=lambda: ["anomaly"])
    """Event kinds (``{device}/events/{kind}``) that make work orders."""
    min_severity: Literal["info", "warning", "critical"] = "warning"
    """Events below it make none (``info``, the simulator's ground truth, is no fault)."""
    correlate_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """The storm window: a raise waits this long (from the line's first held raise) for
    others on its line; 0 turns correlation off (every fault its own work order at once)."""
    correlate_min: Annotated[int, msgspec.Meta(ge=2)] = 5
    """Devices of one line raising within ``correlate_s`` that make one line incident."""
    state_file: str = "var/notifier-state.json"
    """What was opened (work order per event id, the receiver's record id), held raises."""
    keep_s: Annotated[int, msgspec.Meta(ge=60)] = 7 * 86_400
    """A resolved work order is remembered this long (a late re-delivery opens nothing)."""
    journal: JournalSettings = JournalSettings()

    def idle_reason(self) -> str | None:
        if self.webhook is None:
            return "no webhook configured (services.notifier.webhook)"
        return None

    def filters(self, config: UnsConfig) -> list[str]:
        ns = config.namespace
        return [f"{ns.enterprise}/{ns.site}/+/+/+/+/events/{kind}" for kind in self.kinds]

    def scope(self, config: UnsConfig) -> Scope:
        """Reads the site's events of ``kinds``; publishes nothing (the webhook is HTTP)."""
        return Scope(subscribe=tuple(self.filters(config)))
