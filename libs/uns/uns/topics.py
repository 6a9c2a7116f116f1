"""The namespace: ISA-95 device paths, topic building and parsing, wildcard matching.

This is the one implementation of the topic rules; services never build topics
with f-strings. The tree is::

    {enterprise}/{site}/{area}/{line}/{cell}/{device}/{stream}/{message}   device topics
    {enterprise}/{site}/_node/{node_id}/{message}                          service nodes

Every level is a slug (``[a-z0-9][a-z0-9_-]*``). ``_node`` can never be an area,
because a slug cannot start with an underscore.
"""

from __future__ import annotations

import re
from typing import Final, Literal, get_args

from uns.errors import TopicError

SLUG: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
LEVELS: Final = ("enterprise", "site", "area", "line", "cell", "device")
NODE_LEVEL: Final = "_node"
HEALTH_LEVEL: Final = "_health"
"""The last level of a group's health topic,
``{enterprise}/{site}[/{area}[/{line}[/{cell}]]]/_health`` (like ``_node``, never a slug)."""

OEE_LEVEL: Final = "_oee"
"""The level after a line or cell in its OEE topics,
``{enterprise}/{site}/{area}/{line}[/{cell}]/_oee/{shift|hour}``."""
OEE_WINDOWS: Final = ("shift", "hour")

Stream = Literal["raw", "features", "scores", "events", "cmd"]
STREAMS: Final[tuple[str, ...]] = get_args(Stream)
# Messages every stream may carry; events and cmd also take their own kinds (slugs).
LIFECYCLE: Final = ("birth", "data", "death")
NodeMessage = Literal["birth", "death", "cmd"]
NODE_MESSAGES: Final[tuple[str, ...]] = get_args(NodeMessage)


def check_slug(value: str, what: str = "level") -> str:
    """Return ``value`` if it is a valid namespace slug, else raise `TopicError`."""
    if not isinstance(value, str) or SLUG.fullmatch(value) is None:
        raise TopicError(
            f"invalid {what} {value!r}: use lowercase letters, digits, '-' and '_',"
            " starting with a letter or digit (at most 64 characters)"
        )
    return value


class DevicePath:
    """The six ISA-95 levels that name one device, validated once on creation.

    >>> str(DevicePath.parse("acme/pune/stamping/line-3/cell-b/press-07"))
    'acme/pune/stamping/line-3/cell-b/press-07'
    """

    __slots__ = ("area", "cell", "device", "enterprise", "line", "site")

    enterprise: str
    site: str
    area: str
    line: str
    cell: str
    device: str

    def __init__(self, enterprise: str, site: str, area: str, line: str, cell: str, device: str):
        for name, value in zip(LEVELS, (enterprise, site, area, line, cell, device), strict=True):
            object.__setattr__(self, name, check_slug(value, name))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("DevicePath is immutable")

    @classmethod
    def parse(cls, text: str) -> DevicePath:
        """Parse ``enterprise/site/area/line/cell/device``."""
        parts = text.split("/")
        if len(parts) != len(LEVELS):
            raise TopicError(
                f"invalid device path {text!r}: expected 6 levels"
                f" (enterprise/site/area/line/cell/device), got {len(parts)}"
            )
        return cls(*parts)

    @property
    def levels(self) -> tuple[str, str, str, str, str, str]:
        return (self.enterprise, self.site, self.area, self.line, self.cell, self.device)

    def topic(self, stream: Stream, message: str) -> str:
        """The topic of one message of this device: ``<path>/<stream>/<message>``."""
        if stream not in STREAMS:
            raise TopicError(f"invalid stream {stream!r}: expected one of {', '.join(STREAMS)}")
        check_slug(message, "message")
        return f"{self}/{stream}/{message}"

    def __str__(self) -> str:
        return "/".join(self.levels)

    def __repr__(self) -> str:
        return f"DevicePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DevicePath) and self.levels == other.levels

    def __hash__(self) -> int:
        return hash(self.levels)

    def __lt__(self, other: DevicePath) -> bool:
        return self.levels < other.levels


class DeviceTopic:
    """A parsed device topic."""

    __slots__ = ("message", "path", "stream")

    def __init__(self, path: DevicePath, stream: Stream, message: str) -> None:
        self.path = path
        self.stream = stream
        self.message = message

    def __str__(self) -> str:
        return self.path.topic(self.stream, self.message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeviceTopic) and (self.path, self.stream, self.message) == (
            other.path,
            other.stream,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.stream, self.message))

    def __repr__(self) -> str:
        return f"DeviceTopic({str(self)!r})"


class NodeTopic:
    """A parsed service-node topic: ``{enterprise}/{site}/_node/{node_id}/{message}``."""

    __slots__ = ("enterprise", "message", "node_id", "site")

    def __init__(self, enterprise: str, site: str, node_id: str, message: NodeMessage) -> None:
        self.enterprise = check_slug(enterprise, "enterprise")
        self.site = check_slug(site, "site")
        self.node_id = check_slug(node_id, "node id")
        if message not in NODE_MESSAGES:
            raise TopicError(
                f"invalid node message {message!r}: expected one of {', '.join(NODE_MESSAGES)}"
            )
        self.message = message

    def __str__(self) -> str:
        return f"{self.enterprise}/{self.site}/{NODE_LEVEL}/{self.node_id}/{self.message}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeTopic) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"NodeTopic({str(self)!r})"


def node_topic(enterprise: str, site: str, node_id: str, message: NodeMessage) -> str:
    """The topic of a service node's birth, death or command."""
    return str(NodeTopic(enterprise, site, node_id, message))


def health_topic(group: tuple[str, ...]) -> str:
    """The retained health topic of a site, area, line or cell: its 2 to 5 levels, then
    ``_health``."""
    if not 2 <= len(group) <= 5:
        raise TopicError(f"a health group has 2 to 5 levels (site to cell), got {len(group)}")
    for name, value in zip(LEVELS, group, strict=False):
        check_slug(value, name)
    return "/".join((*group, HEALTH_LEVEL))


def oee_topic(group: tuple[str, ...], window: str) -> str:
    """The retained OEE topic of a line (4 levels) or cell (5) over ``window`` (``shift``,
    ``hour``)."""
    if not 4 <= len(group) <= 5:
        raise TopicError(f"an OEE group is a line or a cell (4 or 5 levels), got {len(group)}")
    if window not in OEE_WINDOWS:
        raise TopicError(f"an OEE window is one of {', '.join(OEE_WINDOWS)}, got {window!r}")
    for name, value in zip(LEVELS, group, strict=False):
        check_slug(value, name)
    return "/".join((*group, OEE_LEVEL, window))


def parse(topic: str) -> DeviceTopic | NodeTopic:
    """Parse a namespace topic; raise `TopicError` naming what is wrong."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[2] == NODE_LEVEL:
        return NodeTopic(parts[0], parts[1], parts[3], parts[4])  # type: ignore[arg-type]
    if len(parts) != 8:
        raise TopicError(
            f"not a namespace topic {topic!r}: expected"
            " enterprise/site/area/line/cell/device/stream/message"
            " or enterprise/site/_node/node_id/message"
        )
    stream = parts[6]
    if stream not in STREAMS:
        raise TopicError(
            f"invalid stream {stream!r} in {topic!r}: expected one of {', '.join(STREAMS)}"
        )
    return DeviceTopic(DevicePath(*parts[:6]), stream, check_slug(parts[7], "message"))  # type: ignore[arg-type]


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter."""
    if not topic_filter:
        raise TopicError("empty topic filter")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise TopicError(f"invalid filter {topic_filter!r}: '#' must be the last level")
        elif level != "+" and ("#" in level or "+" in level):
            raise TopicError(f"invalid filter {topic_filter!r}: a wildcard must fill a whole level")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 matching of ``topic`` against ``topic_filter``.

    Wildcards at the first level never match topics that start with ``$``
    (``#`` does not see ``$SYS/...``), as section 4.7.2 of the standard says.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def device_filter(
    path: DevicePath | None = None, stream: Stream | Literal["+"] = "+", message: str = "+"
) -> str:
    """A subscription filter for one device (or every device) and stream."""
    base = str(path) if path is not None else "+/+/+/+/+/+"
    return validate_filter(f"{base}/{stream}/{message}")
