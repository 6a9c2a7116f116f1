"""Device sharding between the replicas of a service: each device handled by one of them.

Replicas of a service that keeps per-device state (the featurizer's windows, inference's
events) must not each receive every device: two replicas would compute every window
twice. With ``replicas: N`` in its settings and node ids ``{base}-0`` .. ``{base}-{N-1}``,
every replica computes, from the device path and the set of replicas it sees alive, the
same owner by rendezvous (highest-random-weight) hashing, and handles only its own
devices' data and deaths. Births reach every replica, so a device that moves finds its
metric definitions there (births are retained and sent once).

The live set comes from the replicas' own node births and deaths (retained; a crash is
the broker's Last Will at once, a hang within the keepalive). A replica that dies hands
its devices to the survivors, and only those move: every other device keeps its owner.
A device that moves starts fresh windows and event state on its new owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Final

from uns.errors import TopicError
from uns.scope import Scope
from uns.topics import DeviceTopic, NodeTopic, node_topic, parse

log = logging.getLogger(__name__)

SHARDED_MESSAGES: Final = frozenset({"data", "death"})
"""Device messages only the owner handles; births go to every replica."""


def weight(replica: str, device: str) -> int:
    """The rendezvous weight of ``replica`` for ``device``: alike in every process."""
    digest = hashlib.blake2b(f"{replica}\0{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(device: str, replicas: set[str] | frozenset[str]) -> str:
    """The replica of ``replicas`` that handles ``device`` (ties broken by name)."""
    return max(replicas, key=lambda r: (weight(r, device), r))


def replica_ids(node_id: str, replicas: int) -> tuple[str, ...]:
    """The node ids of the replica set ``node_id`` belongs to (``{base}-0`` ..), or of the
    set named ``node_id`` when it carries no index (the policy's view of a service section
    whose replicas get their ids at start)."""
    base, _, index = node_id.rpartition("-")
    if not (base and index.isdigit()):
        base = node_id
    return tuple(f"{base}-{j}" for j in range(replicas))


def peers_scope(enterprise: str, site: str, node_id: str, replicas: int) -> Scope:
    """What a replica reads of the others: their node births and deaths (the broker policy
    grants it, or a secure broker would hide the replica set and every replica would
    handle every device)."""
    return Scope(
        subscribe=tuple(
            node_topic(enterprise, site, m, message)
            for m in replica_ids(node_id, replicas)
            if m != node_id
            for message in ("birth", "death")
        )
    )


class Shard:
    """One replica's view of its replica set, and which devices are its own."""

    def __init__(self, enterprise: str, site: str, node_id: str, replicas: int) -> None:
        if node_id not in replica_ids(node_id, replicas):
            raise ValueError(
                f"node id {node_id!r}: with replicas: {replicas}, the node id must be"
                f" {{name}}-{{index}}, index 0..{replicas - 1} (e.g. {node_id}-0)"
            )
        self.me = node_id
        self.members: Final = frozenset(replica_ids(node_id, replicas))
        self.topics: Final = peers_scope(enterprise, site, node_id, replicas).subscribe
        """The other replicas' node births and deaths: subscribed to before any data."""
        self.live: set[str] = {node_id}
        self._dead_retained: set[str] = set()
        self._owners: dict[str, bool] = {}
        self.changed = asyncio.Event()
        """Set whenever the live set changes (for whoever waits on it: tests, a status)."""

    def observe(self, topic: str, retained: bool) -> bool:
        """Take in another replica's node birth or death (non-empty); True if it was one."""
        try:
            parsed = parse(topic)
        except TopicError:
            return False
        if not isinstance(parsed, NodeTopic) or parsed.node_id not in self.members:
            return False
        node = parsed.node_id
        if node == self.me:
            return True
        before = set(self.live)
        if parsed.message == "death":
            self.live.discard(node)
            if retained:
                # on (re)subscribing both a dead node's birth and its death are retained,
                # in either order: the retained death wins over the retained birth
                self._dead_retained.add(node)
        elif parsed.message == "birth":
            if not retained:
                self._dead_retained.discard(node)  # born again since
            if node not in self._dead_retained:
                self.live.add(node)
        if self.live != before:
            self._owners.clear()
            self.changed.set()
            log.info(
                "%s: live replicas now %s (of %d)",
                self.me,
                ", ".join(sorted(self.live)),
                len(self.members),
            )
        return True

    def owns(self, topic: str) -> bool:
        """Whether this replica handles ``topic``: every topic but another's device's data
        and deaths."""
        try:
            parsed = parse(topic)
        except TopicError:
            return True  # not a device's: the handlers judge it
        if not isinstance(parsed, DeviceTopic) or parsed.message not in SHARDED_MESSAGES:
            return True
        return self.owns_device(str(parsed.path))

    def owns_device(self, device: str) -> bool:
        """Whether this replica handles the device at path ``device`` now."""
        mine = self._owners.get(device)
        if mine is None:
            if len(self._owners) >= 100_000:  # made-up paths must not grow it for ever
                self._owners.clear()
            mine = self._owners[device] = owner(device, self.live) == self.me
        return mine
