"""What the bridge journals and reads back: `uns.journal_records` (pure, no database
driver: the forwarding rules and the settings import it), re-exported under its old name."""

from __future__ import annotations

from uns.journal_records import EVENT, RETAIN, TELEMETRY, Item, Row

__all__ = ["EVENT", "RETAIN", "TELEMETRY", "Item", "Row"]
