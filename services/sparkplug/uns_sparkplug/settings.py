"""Settings of ``services.sparkplug`` (the north edge node) and ``services.sparkplug-adapter``
(the south adapter): light, uns and the pure codec only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Final

import msgspec

from uns import ServiceSettings
from uns.config import BrokerSettings, PositiveFloat, Slug, Strict, UnsConfig, parse_broker_url
from uns.errors import ConfigError, TopicError
from uns.scope import Scope
from uns.topics import NODE_LEVEL, DevicePath
from uns_sparkplug.ids import check_id

STREAMS: Final = ("raw", "features", "scores", "events")
SCADA_USER: Final = "scada"
"""The broker user `uns broker secure` makes for the Sparkplug host (`SparkplugSettings.peers`)."""


class SparkplugBroker(Strict, frozen=True):
    """The broker the Sparkplug side speaks to; absent: the namespace's own broker, with
    its credentials (the usual set-up: Ignition's MQTT Engine subscribes to the box)."""

    url: str
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=1200)] = 30

    def __post_init__(self) -> None:
        try:
            parse_broker_url(self.url, "url")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: give one")

    def settings(self) -> BrokerSettings:
        """The same broker as the runtime's settings, which `uns.bus.connect` takes."""
        return BrokerSettings(
            url=self.url,
            username=self.username,
            password=self.password,
            password_file=self.password_file,
            ca_file=self.ca_file,
            keepalive_s=self.keepalive_s,
        )


def _check_ids(**ids: str | None) -> None:
    for field, value in ids.items():
        if value is not None:
            try:
                check_id(value, field)
            except ValueError as exc:
                raise ValueError(str(exc)) from None


class SparkplugSettings(ServiceSettings, frozen=True):
    """``services.sparkplug``: the namespace as one Sparkplug B 3.0 edge node (off by
    default; ``enabled: true`` turns it on)."""

    default_metrics_port: ClassVar[int] = 9408

    enabled: bool = False
    broker: SparkplugBroker | None = None
    group_id: str | None = None
    """Sparkplug group id; default the enterprise."""
    edge_node_id: str | None = None
    """Sparkplug edge node id; default the site."""
    primary_host_id: str | None = None
    """With it: NBIRTH only while ``spBv1.0/STATE/{primary_host_id}`` says online, and on
    offline NDEATH, disconnect and start over (Sparkplug 3.0 primary host)."""
    streams: list[str] = msgspec.field(default_factory=lambda: list(STREAMS))
    """Streams mirrored as metrics: raw (slow tags), features, scores, events."""
    waveforms: bool = False
    """Mirror waveform metrics of the raw streams too (as FloatArray): off, they are big."""
    areas: list[Slug] = []
    """Only these areas (empty: every area of the site)."""
    writable: list[str] = []
    """Tags a Sparkplug host may write, as ``{device path}/{raw metric}``; a DCMD to one is
    forwarded as a ``cmd/write`` command to that device (``args``: metric, value), the
    value checked against the tag's range. Every other write is refused and counted."""
    cmd_log_interval_s: PositiveFloat = 60.0
    """Refused writes (DCMD) are logged at most once per this time (all are counted)."""

    def __post_init__(self) -> None:
        _check_ids(
            group_id=self.group_id,
            edge_node_id=self.edge_node_id,
            primary_host_id=self.primary_host_id,
        )
        for i, tag in enumerate(self.writable):
            device, _, metric = tag.rpartition("/")
            try:
                DevicePath.parse(device)
            except TopicError as exc:
                raise ValueError(f"writable[{i}]: {exc}") from None
            if not metric:
                raise ValueError(f"writable[{i}]: {tag!r} names no metric")
        for i, stream in enumerate(self.streams):
            if stream not in STREAMS:
                raise ValueError(f"streams[{i}]: {stream!r} is not one of {', '.join(STREAMS)}")

    def ids(self, config: UnsConfig) -> tuple[str, str]:
        ns = config.namespace
        return self.group_id or ns.enterprise, self.edge_node_id or ns.site

    def filters(self, config: UnsConfig) -> list[str]:
        ns = config.namespace
        areas = self.areas or ["+"]
        return [
            f"{ns.enterprise}/{ns.site}/{area}/+/+/+/{stream}/#"
            for stream in self.streams
            for area in areas
        ]

    def node_deaths(self, config: UnsConfig) -> str:
        """The namespace's node deaths: a producer's death takes its streams with it."""
        ns = config.namespace
        return f"{ns.enterprise}/{ns.site}/{NODE_LEVEL}/+/death"

    def scope(self, config: UnsConfig) -> Scope:
        """Reads the mirrored streams and the node deaths; publishes nothing into the
        namespace. On the namespace's broker (no ``broker``) its Sparkplug connection's
        topics too: the edge node's messages, its commands, the primary host's STATE."""
        subscribe = [*self.filters(config), self.node_deaths(config)]
        publish = sorted({f"{t.rpartition('/')[0]}/cmd/write" for t in self.writable})
        if self.broker is None:
            group, edge = self.ids(config)
            publish += [f"spBv1.0/{group}/+/{edge}", f"spBv1.0/{group}/+/{edge}/+"]
            subscribe += [f"spBv1.0/{group}/NCMD/{edge}", f"spBv1.0/{group}/DCMD/{edge}/+"]
            if self.primary_host_id:
                subscribe.append(f"spBv1.0/STATE/{self.primary_host_id}")
        return Scope(publish=tuple(publish), subscribe=tuple(subscribe))

    def peers(self, config: UnsConfig) -> dict[str, Scope]:
        """On the namespace's broker, the SCADA host (Ignition's MQTT Engine, any Sparkplug
        host application) logs in as ``scada``: it reads this edge node's group, sends its
        node and device commands (which the edge node refuses unless a tag is
        ``writable``) and publishes its own STATE. Nothing of the namespace itself."""
        if self.broker is not None:
            return {}
        group, edge = self.ids(config)
        return {
            SCADA_USER: Scope(
                publish=(
                    f"spBv1.0/{group}/NCMD/{edge}",
                    f"spBv1.0/{group}/DCMD/{edge}/+",
                    "spBv1.0/STATE/+",
                ),
                subscribe=(f"spBv1.0/{group}/#", "spBv1.0/STATE/+"),
            )
        }


class SparkplugAdapterSettings(ServiceSettings, frozen=True):
    """``services.sparkplug-adapter``: Sparkplug edge nodes of a broker into the namespace
    (off by default; ``enabled: true`` turns it on)."""

    default_metrics_port: ClassVar[int] = 9409

    enabled: bool = False
    broker: SparkplugBroker | None = None
    groups: list[str] = []
    """Sparkplug group ids taken (empty: every group)."""
    host_id: str | None = None
    """Publish ``spBv1.0/STATE/{host_id}`` as a primary host application (its will says
    offline); absent: a plain subscriber."""
    area: Slug = "sparkplug"
    """Area of a device whose id is not ``area.line.cell.device`` (then the line is the
    group id, the cell the edge node id, the device the device id, each made a slug)."""
    rebirth_request_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """At most one rebirth request (NCMD) per edge node per this time."""

    def __post_init__(self) -> None:
        _check_ids(host_id=self.host_id)
        for i, group in enumerate(self.groups):
            _check_ids(**{f"groups[{i}]": group})

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes the raw streams of the devices it maps into this site. On the
        namespace's broker (no ``broker``) its Sparkplug connection's topics too: every
        message of the groups it takes, rebirth requests (NCMD), its STATE."""
        ns = config.namespace
        publish = [f"{ns.enterprise}/{ns.site}/+/+/+/+/raw/+"]
        subscribe: list[str] = []
        if self.broker is None:
            for group in self.groups or ["+"]:
                subscribe.append(f"spBv1.0/{group}/#")
                publish.append(f"spBv1.0/{group}/NCMD/+")
            if self.host_id:
                publish.append(f"spBv1.0/STATE/{self.host_id}")
        return Scope(publish=tuple(publish), subscribe=tuple(subscribe))
