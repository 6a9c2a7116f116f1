"""``uns run bridge``: store-and-forward of the namespace to a remote ("cloud") broker.

Selected streams (features, scores, events and the births that describe them) are
journaled in SQLite before they count as taken, and leave the journal only when the
remote acknowledged them (QoS 1): a WAN outage, a restart or a ``kill -9`` loses
nothing that was taken. See the README's "bridge" section.
"""

from uns_bridge.service import Bridge
from uns_bridge.settings import BridgeSettings, JournalSettings, Remote

__all__ = ["Bridge", "BridgeSettings", "JournalSettings", "Remote"]
