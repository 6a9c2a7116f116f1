"""What a journal (`uns.journal`) keeps and gives back: messages, their priority and flags.

Pure records, apart from the journal's SQLite, so that forwarding rules (the bridge's
`logic`) and the settings that check them import no database driver.
"""

from __future__ import annotations

from typing import Final, NamedTuple

TELEMETRY: Final = 0
EVENT: Final = 1
"""Priorities: at the disk cap telemetry is dropped first, events (and births) last."""
RETAIN: Final = 1
"""Flag bit: a birth or death, published retained where the remote keeps them."""


class Item(NamedTuple):
    """A message to journal."""

    topic: str
    payload: bytes
    priority: int = TELEMETRY
    flags: int = 0
    ts_ms: int = 0
    """When the bridge took it (ms since the epoch); 0 = now."""
    redelivered: bool = False
    """Sent again by the local broker (MQTT DUP): journaled only if not taken already."""


class Row(NamedTuple):
    """A journaled message."""

    id: int
    ts_ms: int
    flags: int
    topic: str
    payload: bytes
