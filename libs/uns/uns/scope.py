"""What a service may publish and subscribe to: the one declaration the runtime and the
broker policy both read.

A service's settings declare its scope (`ServiceSettings.scope`, light: no service module
is imported to read it), possibly from the config (the devices of a tag map, the filters
a bridge forwards). The `Node` adds its own topics (`node_scope`), refuses to publish
outside the whole (counted as ``reason="out_of_scope"``) and to subscribe outside it (a
bug: an error at start), and `uns broker secure` turns the same scopes into broker ACLs,
so a service that the broker lets in can do exactly what its code does, and no more.
"""

from __future__ import annotations

from typing import Final

import msgspec

from uns.topics import NODE_LEVEL, matches, validate_filter

REPLY_FILTER: Final = "uns-cli/#"
"""Where the replies to node commands are read (an operator, the ``uns`` command line)."""


def reply_prefix(node_id: str) -> str:
    """Where node ``node_id`` answers a command's ``args.reply_to`` in a secure deployment:
    under its own id, so that the broker's ACL lets no other node answer in its name (a
    compromised service cannot forge another's reply). The runtime also answers under its
    own ``{enterprise}/{site}/`` outside the contract, which the generated ACLs do not grant."""
    return f"uns-cli/{node_id}/"


class Scope(msgspec.Struct, frozen=True):
    """Topic filters one client publishes to and subscribes to (``+``/``#`` allowed)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in (*self.publish, *self.subscribe):
            validate_filter(f)

    def may_publish(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        """Every topic ``topic_filter`` matches is one of ours to receive."""
        return any(within(topic_filter, f) for f in self.subscribe)

    def __or__(self, other: Scope) -> Scope:
        return Scope(
            publish=_unique(self.publish + other.publish),
            subscribe=_unique(self.subscribe + other.subscribe),
        )


def _unique(filters: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(filters))


def within(inner: str, outer: str) -> bool:
    """Every topic filter ``inner`` matches, filter ``outer`` matches too.

    >>> within("+/+/a/data", "+/+/a/+"), within("#", "acme/#"), within("acme/+", "acme/#")
    (True, False, True)
    """
    i_levels, o_levels = inner.split("/"), outer.split("/")
    for n, o in enumerate(o_levels):
        if o == "#":
            return True
        if n >= len(i_levels):
            return False
        i = i_levels[n]
        if i == "#" and n == 0 and o == "+" and o_levels[1:] == ["#"]:
            return True  # a topic has at least one level: '#' and '+/#' match the same
        if i == "#" or (o != "+" and (i == "+" or i != o)):
            return False
    return len(i_levels) == len(o_levels)


def node_scope(enterprise: str, site: str, node_id: str) -> Scope:
    """What every node does: its birth, its death (also its Last Will), its command, the
    replies to commands."""
    base = f"{enterprise}/{site}/{NODE_LEVEL}/{node_id}"
    return Scope(
        publish=(f"{base}/birth", f"{base}/death", f"{reply_prefix(node_id)}#"),
        subscribe=(f"{base}/cmd",),
    )


def devices_scope(paths: list[str], stream: str) -> tuple[str, ...]:
    """A stream's lifecycle topics (birth, data, death) of each device in ``paths``."""
    return tuple(f"{path}/{stream}/+" for path in paths)
