"""What the bridge decides, without I/O: which messages, under which remote topic, with
which id, in which envelope, how fast, and what a connection error means."""

from __future__ import annotations

import datetime as dt
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import msgspec

from uns.topics import NODE_LEVEL, matches
from uns_bridge.records import EVENT, RETAIN, TELEMETRY, Row

TOPIC_FIELDS: Final = (
    "topic",
    "enterprise",
    "site",
    "area",
    "line",
    "cell",
    "device",
    "stream",
    "message",
    "client_id",
)
"""Placeholders of the remote topic template."""
CONNECT_FIELDS: Final = ("enterprise", "site", "node_id", "host", "client_id")
"""Placeholders of ``remote.client_id`` and ``remote.username``."""
DEFAULT_CLIENT_ID: Final = "{enterprise}-{site}-{node_id}"
AZURE_API_VERSION: Final = "2021-04-12"
_RULES_PREFIX: Final = "$aws/rules/"
SAMPLE_TOPIC: Final = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
SAMPLE_BATCH_TOPIC: Final = "acme/pune/_node/bridge/batch"


class Unsendable(ValueError):
    """The remote would refuse this message (topic or size): it is never journaled."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def check_template(template: str, allowed: Sequence[str]) -> None:
    """Raise `ValueError` unless ``template`` only uses ``{name}`` placeholders of ``allowed``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            raise ValueError(
                f"{template!r}: unknown placeholder {{{name}}}; use {', '.join(allowed)}"
            )


def fill(template: str, fields: Mapping[str, str]) -> str:
    return template.format_map(fields)


# ---- presets ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preset:
    """The conventions and limits of one kind of endpoint."""

    name: str
    topic: str
    protocol: int
    retain: bool
    username: str | None = None
    max_topic_bytes: int = 65_535
    max_slashes: int | None = None
    max_payload: int = 256 * 1024 * 1024
    max_inflight: int = 1000
    publish_rate: float | None = None
    """Publishes per second the endpoint accepts on one connection (None: no stated limit).
    The default back-fill pace follows it (times ``journal.batch``)."""
    property_bag: bool = False
    """Azure IoT Hub: the UNS topic, the id and the content type travel as the topic's
    property bag (``devices/{id}/messages/events/k=v&k=v``)."""

    def check_topic(self, topic: str) -> None:
        """Raise `Unsendable` if the endpoint would refuse to publish to ``topic``."""
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise Unsendable("topic", f"{topic!r} is not a topic one can publish to")
        body = topic
        if topic.startswith(_RULES_PREFIX):  # AWS Basic Ingest: the prefix does not count
            body = topic[len(_RULES_PREFIX) :].partition("/")[2]
        if not self.property_bag and "" in body.split("/"):
            raise Unsendable("topic", f"{topic!r} has an empty level")
        size = len(topic.encode())
        if size > self.max_topic_bytes:
            raise Unsendable(
                "topic",
                f"{topic!r} is {size} bytes; {self.name} allows {self.max_topic_bytes}",
            )
        if self.max_slashes is not None and body.count("/") > self.max_slashes:
            raise Unsendable(
                "topic",
                f"{topic!r} has {body.count('/')} slashes; {self.name} allows"
                f" {self.max_slashes} (not counting a {_RULES_PREFIX}<rule>/ prefix)",
            )

    def check_sample(self, template: str, sample: str = SAMPLE_TOPIC) -> None:
        """Check a template against a typical topic (at config load)."""
        self.check_topic(fill(template, topic_fields(sample, "client-id")))


PRESETS: Final[dict[str, Preset]] = {
    "generic": Preset(name="generic", topic="{topic}", protocol=5, retain=True),
    # AWS IoT Core: topics of at most 256 bytes and 7 slashes (a $aws/rules/<rule>/
    # Basic Ingest prefix excepted), payloads of 128 KiB, 100 unacknowledged publishes
    # and 100 publishes/s per connection, client id = the thing name (<= 128 bytes).
    # The UNS topic already has 7 slashes, so it goes as it is: no room for a prefix.
    "aws-iot": Preset(
        name="aws-iot",
        topic="{topic}",
        protocol=5,
        retain=True,
        max_topic_bytes=256,
        max_slashes=7,
        max_payload=128 * 1024,
        max_inflight=100,
        publish_rate=100.0,
    ),
    # Azure IoT Hub: MQTT 3.1.1, client id = device id, username
    # {hub}.azure-devices.net/{device}/?api-version=..., one telemetry topic per device
    # whose property bag carries our topic and id, messages of at most 256 KiB, no retain.
    # Device-to-cloud sends are throttled per hub: 100/s for a one-unit S1 hub.
    "azure-iot-hub": Preset(
        name="azure-iot-hub",
        topic="devices/{client_id}/messages/events/",
        protocol=4,
        retain=False,
        username="{host}/{client_id}/?api-version=" + AZURE_API_VERSION,
        max_topic_bytes=65_535,
        max_payload=256 * 1024,
        max_inflight=1000,
        publish_rate=100.0,
        property_bag=True,
    ),
}


GENERIC_BACKFILL_RATE: Final = 5000.0
"""Messages/s of a back-fill to an endpoint with no stated limit: about 40 Mbit/s of
1-kB messages, a fifth of what the bridge can send on a 2-core box (10,500/s)."""


def backfill_rate(configured: float | None, preset: Preset | None, batch: int) -> float:
    """The pace of a back-fill in messages/s: as configured, else the endpoint's limit."""
    if configured is not None:
        return configured
    if preset is not None and preset.publish_rate is not None:
        return preset.publish_rate * batch
    return GENERIC_BACKFILL_RATE


# ---- selection and classification -----------------------------------------------------


class Selector:
    """Include/exclude filters; a topic matching several includes is taken once."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self.include = list(include)
        self.exclude = list(exclude)

    def first(self, topic: str) -> int | None:
        """Index of the first include filter that matches and no exclude does, or None."""
        if any(matches(f, topic) for f in self.exclude):
            return None
        for i, f in enumerate(self.include):
            if matches(f, topic):
                return i
        return None


def classify(topic: str) -> tuple[int, int]:
    """(priority, flags): events, births and deaths are kept longest at the disk cap;
    births and deaths are the retained state of a device or node."""
    levels = topic.split("/")
    if len(levels) == 8:
        if levels[7] in ("birth", "death"):
            return EVENT, RETAIN
        if levels[6] == "events":
            return EVENT, 0
    elif len(levels) == 5 and levels[2] == NODE_LEVEL and levels[4] in ("birth", "death"):
        return EVENT, RETAIN
    return TELEMETRY, 0


def topic_fields(topic: str, client_id: str) -> dict[str, str]:
    """Placeholder values of a local topic: the ISA-95 levels of a device topic; for other
    topics only {topic}, {enterprise}, {site} and {message} (the others are empty)."""
    levels = topic.split("/")
    fields = dict.fromkeys(TOPIC_FIELDS, "")
    fields["topic"] = topic
    fields["client_id"] = client_id
    fields["message"] = levels[-1]
    if len(levels) >= 2:
        fields["enterprise"], fields["site"] = levels[0], levels[1]
    if len(levels) == 8 and levels[2] != NODE_LEVEL:
        for name, value in zip(TOPIC_FIELDS[3:9], levels[2:], strict=True):
            fields[name] = value
    return fields


def message_id(node_id: str, row_id: int) -> str:
    """The id a receiver deduplicates on: monotonic per bridge (journal row ids)."""
    return f"{node_id}-{row_id}"


# ---- what goes on the wire -------------------------------------------------------------


class BatchItem(msgspec.Struct, frozen=True):
    """One message of a batch envelope (``journal.batch`` > 1)."""

    id: str
    topic: str
    """The local (UNS) topic."""
    ts: int
    """When the bridge took it, ms since the epoch."""
    payload: msgspec.Raw
    """The message's own JSON, byte for byte."""


_batch_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Outbound:
    topic: str
    payload: bytes
    retain: bool
    user_properties: dict[str, str]
    ids: tuple[int, ...]


class Router:
    """Turns journaled messages into remote publishes, by the preset's conventions."""

    def __init__(
        self,
        preset: Preset,
        *,
        node_id: str,
        client_id: str,
        template: str | None = None,
        retain: bool | None = None,
        enterprise: str = "",
        site: str = "",
    ) -> None:
        self.preset = preset
        self.node_id = node_id
        self.client_id = client_id
        self.template = template or preset.topic
        self.retain = preset.retain if retain is None else retain
        self.batch_topic = f"{enterprise}/{site}/{NODE_LEVEL}/{node_id}/batch"
        self._rendered: dict[str, str] = {}

    def render(self, topic: str) -> str:
        """The remote topic of a local topic (without Azure's property bag)."""
        if self.template == "{topic}":
            return topic
        rendered = self._rendered.get(topic)
        if rendered is None:
            if len(self._rendered) >= 10_000:  # topics are few (devices x streams): a bound
                self._rendered.clear()
            rendered = fill(self.template, topic_fields(topic, self.client_id))
            self._rendered[topic] = rendered
        return rendered

    def check(self, topic: str, size: int) -> None:
        """Raise `Unsendable` for a message the remote would refuse (before journaling)."""
        self.preset.check_topic(self.render(topic))
        if size > self.preset.max_payload:
            raise Unsendable(
                "too_large",
                f"{size} bytes on {topic}; {self.preset.name} takes at most"
                f" {self.preset.max_payload} bytes",
            )

    def _bag(self, pairs: Sequence[tuple[str, str]]) -> str:
        return "&".join(f"{quote(k, safe='$.')}={quote(v, safe='')}" for k, v in pairs)

    def single(self, row: Row) -> Outbound:
        mid = message_id(self.node_id, row.id)
        topic = self.render(row.topic)
        props = {"uns-id": mid}
        if self.preset.property_bag:
            topic += self._bag(
                [
                    ("$.ct", "application/json"),
                    ("$.ce", "utf-8"),
                    ("uns-topic", row.topic),
                    ("uns-id", mid),
                ]
            )
        elif topic != row.topic:
            props["uns-topic"] = row.topic
        retain = self.retain and bool(row.flags & RETAIN)
        return Outbound(topic, row.payload, retain, props, (row.id,))

    def batch(self, rows: Sequence[Row]) -> Outbound:
        """A JSON array of `BatchItem` on the bridge's ``.../_node/{id}/batch`` topic."""
        items = [
            BatchItem(message_id(self.node_id, r.id), r.topic, r.ts_ms, msgspec.Raw(r.payload))
            for r in rows
        ]
        payload = _batch_encoder.encode(items)
        first = message_id(self.node_id, rows[0].id)
        topic = self.render(self.batch_topic)
        props = {"uns-id": first, "uns-count": str(len(rows))}
        if self.preset.property_bag:
            topic += self._bag(
                [
                    ("$.ct", "application/json"),
                    ("$.ce", "utf-8"),
                    ("uns-topic", self.batch_topic),
                    ("uns-id", first),
                    ("uns-count", str(len(rows))),
                ]
            )
        else:
            props["uns-topic"] = self.batch_topic
        return Outbound(topic, payload, False, props, tuple(r.id for r in rows))

    def group(self, rows: Sequence[Row], batch: int) -> list[list[Row]]:
        """Split rows (in order) into publishes: single messages with ``batch=1``, else
        up to ``batch`` per envelope within the preset's payload limit. Births and
        deaths always travel alone (retained where the remote keeps them)."""
        if batch <= 1:
            return [[r] for r in rows]
        out: list[list[Row]] = []
        current: list[Row] = []
        size = 2
        limit = self.preset.max_payload
        for r in rows:
            if r.flags & RETAIN and self.retain:
                if current:
                    out.append(current)
                    current, size = [], 2
                out.append([r])
                continue
            cost = len(r.payload) + len(r.topic) + 80
            if current and (len(current) >= batch or size + cost > limit):
                out.append(current)
                current, size = [], 2
            current.append(r)
            size += cost
        if current:
            out.append(current)
        return out

    def outbound(self, group: Sequence[Row]) -> Outbound:
        return self.single(group[0]) if len(group) == 1 else self.batch(group)


def connect_fields(
    *, enterprise: str, site: str, node_id: str, host: str, client_id: str = ""
) -> dict[str, str]:
    return {
        "enterprise": enterprise,
        "site": site,
        "node_id": node_id,
        "host": host,
        "client_id": client_id,
    }


# ---- pacing ----------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` messages per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def delay(self, n: int) -> float:
        """Take ``n`` tokens; return how long to wait before sending them."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def backoff(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff: ``low * 2**attempt`` capped at ``high``, +-20%."""
    delay = min(high, low * 2 ** min(attempt, 16))
    return float(delay * (rng or random).uniform(0.8, 1.2))


# ---- diagnosis -------------------------------------------------------------------------

_CAUSES: Final = (
    ("hostname mismatch", "the remote's certificate does not name the host of remote.url"),
    ("ip address mismatch", "the remote's certificate does not name the host of remote.url"),
    ("certificate has expired", "a certificate has expired (the remote's, or its CA's)"),
    ("certificate_verify_failed", "the remote's certificate is not trusted (remote.ca_file)"),
    (
        "certificate required",
        "the remote requires a client certificate (set remote.cert_file and remote.key_file)",
    ),
    ("alert unknown ca", "the remote refused our client certificate (remote.cert_file)"),
    ("alert bad certificate", "the remote refused our client certificate (remote.cert_file)"),
    ("alert certificate unknown", "the remote refused our client certificate"),
    ("alert certificate expired", "the remote says our client certificate has expired"),
    ("alert certificate revoked", "the remote says our client certificate was revoked"),
    ("cert_file/key_file", "cannot load the client certificate or key (remote.cert_file)"),
    ("wrong version number", "the remote does not speak TLS there (mqtt:// port?)"),
    ("eof occurred in violation of protocol", "the connection was closed during the TLS handshake"),
    ("disconnected during message iteration", "the connection dropped"),
    ("refused the message", "the remote refused a message (its policy or ACL for our topics)"),
    ("not authorized", "the remote refused our identity (client id, username or policy)"),
    ("bad user name or password", "the remote refused our username or password"),
    (
        "unsupported protocol version",
        "the remote does not speak this MQTT version (remote.protocol: 4 is MQTT 3.1.1)",
    ),
    ("client identifier not valid", "the remote refused our client id"),
    ("connection refused", "nothing accepts connections there"),
    ("name or service not known", "the host name does not resolve"),
    ("temporary failure in name resolution", "the host name does not resolve (DNS down?)"),
    ("no route to host", "the network is down"),
    ("network is unreachable", "the network is down"),
    ("timed out", "no answer in time (network down or filtered)"),
)


_LOGIN_REFUSALS: Final = re.compile(
    r"\[code:(134|135|138|140)\]|bad user ?name or password|not authori[sz]ed|\bbanned\b"
    r"|bad authentication method",
    re.IGNORECASE,
)
"""CONNACK refusals of who we are: 0x86 bad user name or password, 0x87 not authorized,
0x8A banned, 0x8C bad authentication method (MQTT 3.1.1's return codes 4 and 5 arrive as
0x86 and 0x87). Retrying those every few seconds locks accounts on many brokers."""


def login_refused(error: str) -> bool:
    """Whether a failed *connect* (not a refused publish) was a refusal of our credentials."""
    return _LOGIN_REFUSALS.search(error) is not None


def explain(error: str) -> str | None:
    """The likely cause of a connection error, in the words of the settings; None if unknown."""
    text = error.lower()
    for needle, cause in _CAUSES:
        if needle in text:
            return cause
    return None


_REFUSED_TOPIC: Final = re.compile(r"refused the message on '([^']*)'")


def refused_own_namespace(error: str, enterprise: str, site: str) -> str | None:
    """What to check when the remote refused a message under this box's own site.

    Several boxes bridged into one central broker each own a site: the central ACL lets a
    box's login write under ``{enterprise}/{site}/`` of its own site only, so two boxes
    that claim one site (a config copied and the site left as it was) cannot overwrite
    each other's node births. The refused box is told so in words, not only "Not
    authorized"; None when the error is not such a refusal."""
    found = _REFUSED_TOPIC.search(error)
    if found is None or not found.group(1).startswith(f"{enterprise}/{site}/"):
        return None
    return (
        f"the remote does not let this box write under {enterprise}/{site}/: if it bridges"
        f" into a central broker shared by several boxes, another box owns site {site!r}"
        " there, or namespace.site is wrong for this box, or the central ACL does not give"
        " remote.username this site"
    )


def cert_days_left(pem: bytes, now: dt.datetime | None = None) -> float:
    """Days until the first certificate of ``pem`` expires (negative once it has)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    now = now or dt.datetime.now(dt.UTC)
    return float((cert.not_valid_after_utc - now).total_seconds() / 86_400)
