"""``uns run sparkplug`` (the namespace as a Sparkplug B 3.0 edge node, for Ignition's MQTT
Engine and every Sparkplug host) and ``uns run sparkplug-adapter`` (Sparkplug edge nodes
into the namespace as raw data). See the README's "Sparkplug B" section.

The names below are what other packages (the bench) may use; the modules are this
package's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_sparkplug.codec import (
        DOUBLE,
        INT64,
        SparkplugError,
        add_property,
        decode_payload,
        device_id,
        new_payload,
    )
    from uns_sparkplug.codec import topic as sparkplug_topic
    from uns_sparkplug.north import SparkplugNode
    from uns_sparkplug.settings import SparkplugAdapterSettings, SparkplugSettings
    from uns_sparkplug.south import SparkplugAdapter

__all__ = [
    "DOUBLE",
    "INT64",
    "SparkplugAdapter",
    "SparkplugAdapterSettings",
    "SparkplugError",
    "SparkplugNode",
    "SparkplugSettings",
    "add_property",
    "decode_payload",
    "device_id",
    "new_payload",
    "sparkplug_topic",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "DOUBLE": "codec",
        "INT64": "codec",
        "SparkplugAdapter": "south",
        "SparkplugAdapterSettings": "settings",
        "SparkplugError": "codec",
        "SparkplugNode": "north",
        "SparkplugSettings": "settings",
        "add_property": "codec",
        "decode_payload": "codec",
        "device_id": "codec",
        "new_payload": "codec",
        "sparkplug_topic": "codec:topic",
    },
)
