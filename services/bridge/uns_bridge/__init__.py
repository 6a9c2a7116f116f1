"""``uns run bridge``: store-and-forward of the namespace to a remote ("cloud") broker.

Selected streams (features, scores, events and the births that describe them) are
journaled in SQLite before they count as taken, and leave the journal only when the
remote acknowledged them (QoS 1): a WAN outage, a restart or a ``kill -9`` loses
nothing that was taken. See the README's "bridge" section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_bridge.journal import Journal
    from uns_bridge.logic import PRESETS, backfill_rate
    from uns_bridge.records import Item as JournalItem
    from uns_bridge.service import Bridge
    from uns_bridge.settings import BridgeSettings, JournalSettings, Remote

__all__ = [
    "PRESETS",
    "Bridge",
    "BridgeSettings",
    "Journal",
    "JournalItem",
    "JournalSettings",
    "Remote",
    "backfill_rate",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "PRESETS": "logic",
        "Bridge": "service",
        "BridgeSettings": "settings",
        "Journal": "journal",
        "JournalItem": "records:Item",
        "JournalSettings": "settings",
        "Remote": "settings",
        "backfill_rate": "logic",
    },
)
