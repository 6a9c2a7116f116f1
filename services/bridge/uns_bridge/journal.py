"""The bridge's journal: `uns.journal` (moved to the runtime library so that other
services, the notifier, journal their outbound deliveries the same way); these names are
kept here so that nothing importing them from the bridge changes."""

from __future__ import annotations

from uns.journal import (
    EVENT,
    RETAIN,
    TAKEN_KEPT,
    TELEMETRY,
    Appended,
    Item,
    Journal,
    JournalFull,
    Row,
)

__all__ = [
    "EVENT",
    "RETAIN",
    "TAKEN_KEPT",
    "TELEMETRY",
    "Appended",
    "Item",
    "Journal",
    "JournalFull",
    "Row",
]
