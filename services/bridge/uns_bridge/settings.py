"""Settings of ``services.bridge``: the remote ("cloud") broker, what to forward, the journal."""

from __future__ import annotations

from typing import Annotated, ClassVar, Final, Literal

import msgspec

from uns import ServiceSettings
from uns.config import PositiveFloat, Strict, UnsConfig, parse_broker_url
from uns.errors import ConfigError, TopicError
from uns.scope import Scope
from uns.topics import validate_filter
from uns_bridge import logic

PresetName = Literal["generic", "aws-iot", "azure-iot-hub"]

DEFAULT_INCLUDE: Final = (
    "+/+/+/+/+/+/features/#",
    "+/+/+/+/+/+/scores/#",
    "+/+/+/+/+/+/events/#",
    "+/+/_node/+/birth",
    "+/+/_node/+/death",
)
"""Features, scores and events with their device births and deaths (``#`` matches them),
and every node's birth and death (who produces them, and whether it is online). Raw
streams, waveforms above all, stay on the plant floor."""


class Remote(Strict, frozen=True):
    """The broker the bridge forwards to; the bridge always dials out, never listens."""

    url: str
    """``mqtts://host:8883``; ``mqtt://`` only with ``allow_plaintext`` (development)."""
    preset: PresetName = "generic"
    """Conventions of the endpoint: topic, client id, username, protocol, limits."""
    client_id: str | None = None
    """MQTT client id (AWS: the thing name, Azure: the device id); may use {enterprise},
    {site}, {node_id}. Default ``{enterprise}-{site}-{node_id}``."""
    username: str | None = None
    """May use {host} and {client_id}; the azure-iot-hub preset sets it."""
    password: str | None = None
    password_file: str | None = None
    """Read at every connect, so a rotated secret (an Azure SAS token) needs no restart."""
    ca_file: str | None = None
    """CA bundle that signed the remote's certificate; the system store when absent."""
    cert_file: str | None = None
    """Client certificate (PEM) for mutual TLS; its expiry is `uns_bridge_cert_days_left`."""
    key_file: str | None = None
    allow_plaintext: bool = False
    """Accept ``mqtt://`` (no TLS): for a test broker on the same machine only."""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=1200)] = 60
    protocol: Literal[4, 5] | None = None
    """4 = MQTT 3.1.1, 5 = MQTT 5 (ids as user properties); default from the preset."""
    retain: bool | None = None
    """Publish births and deaths retained on the remote; default from the preset."""
    link: bool | None = None
    """Publish the bridge's own birth on the remote at every connect, with ``relays``
    naming this box's site, and its death as the connection's Last Will: the centre sees
    a box that went away (power, WAN) within about 2 x ``keepalive_s`` (uns tree marks the
    site's nodes stale). Default: on where births are retained (``retain``)."""
    inflight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    """Publishes awaiting their PUBACK at once (AWS IoT Core allows 100)."""
    timeout_s: PositiveFloat = 10.0
    """Connect and PUBACK timeout; past it the connection is dropped and redialled."""
    reconnect_min_s: PositiveFloat = 1.0
    reconnect_max_s: PositiveFloat = 15.0
    login_retry_min_s: PositiveFloat = 60.0
    """After the remote refused our login (bad username or password, not authorized,
    banned): the first wait, doubling per refusal up to ``login_retry_max_s``, so that a
    wrong or expired secret does not lock the account."""
    login_retry_max_s: PositiveFloat = 1800.0

    def __post_init__(self) -> None:
        try:
            url = parse_broker_url(self.url, "url")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if url.scheme != "mqtts" and not self.allow_plaintext:
            raise ValueError(
                f"url: {self.url!r} is not encrypted; use mqtts:// (or set"
                " allow_plaintext: true for a local test broker, never across a WAN)"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: give one")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is below reconnect_min_s")
        if self.login_retry_max_s < self.login_retry_min_s:
            raise ValueError("login_retry_max_s is below login_retry_min_s")
        preset = logic.PRESETS[self.preset]
        if self.inflight > preset.max_inflight:
            raise ValueError(
                f"inflight: {self.preset} accepts at most {preset.max_inflight}"
                " unacknowledged messages per connection"
            )
        for field, template in (("client_id", self.client_id), ("username", self.username)):
            if template is not None:
                try:
                    logic.check_template(template, logic.CONNECT_FIELDS)
                except ValueError as exc:
                    raise ValueError(f"{field}: {exc}") from None


class JournalSettings(Strict, frozen=True):
    """The durable store between the plant and the WAN."""

    path: str = "var/bridge-journal.sqlite"
    """SQLite file (relative to the working directory); its directory is created."""
    ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 86_400
    """A message not delivered within this many seconds is dropped (reason expired)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 512 * 1024 * 1024
    """Disk cap of the database: beyond it the oldest telemetry goes first, events last."""
    backfill_rate: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Messages per second sent at most (a backlog drains at this rate behind live data).
    Default: the preset's publish limit times ``batch`` (AWS IoT Core, Azure IoT Hub: 100
    publishes/s), 5,000/s for a generic broker."""
    batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    """Messages per outbound publish; above 1 a JSON array envelope (see the README)."""
    batch_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 0
    """How long a partial batch may wait for more messages (live data only)."""
    synchronous: Literal["full", "normal"] = "full"
    """full: a commit survives a power cut (an fsync per group commit); normal: survives a
    crash of the process, not of the machine."""


class BridgeSettings(ServiceSettings, frozen=True):
    """``services.bridge``. Without ``remote`` the bridge idles (``uns up`` may start it)."""

    default_metrics_port: ClassVar[int] = 9404

    remote: Remote | None = None
    include: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_INCLUDE))
    """Topic filters of the local broker to forward."""
    exclude: list[str] = []
    """Topic filters never forwarded, even if included."""
    topic: str | None = None
    """Remote topic template: {topic} {enterprise} {site} {area} {line} {cell} {device}
    {stream} {message} {client_id}; default from the preset."""
    journal: JournalSettings = JournalSettings()

    def __post_init__(self) -> None:
        if not self.include:
            raise ValueError("include: give at least one topic filter")
        for name, filters in (("include", self.include), ("exclude", self.exclude)):
            for i, topic_filter in enumerate(filters):
                try:
                    validate_filter(topic_filter)
                except TopicError as exc:
                    raise ValueError(f"{name}[{i}]: {exc}") from None
        if self.topic is not None:
            try:
                logic.check_template(self.topic, logic.TOPIC_FIELDS)
            except ValueError as exc:
                raise ValueError(f"topic: {exc}") from None
        if self.remote is not None:
            preset = logic.PRESETS[self.remote.preset]
            template = self.topic or preset.topic
            try:
                preset.check_sample(template)
                if self.journal.batch > 1:  # envelopes go to .../_node/{node_id}/batch
                    preset.check_sample(template, logic.SAMPLE_BATCH_TOPIC)
            except logic.Unsendable as exc:
                raise ValueError(f"topic: {exc}") from None

    def idle_reason(self) -> str | None:
        return None if self.remote is not None else "no remote configured (services.bridge.remote)"

    def scope(self, config: UnsConfig) -> Scope:
        """Reads what it forwards (``include``); publishes nothing locally (the cloud is
        another broker)."""
        return Scope(subscribe=tuple(self.include))
