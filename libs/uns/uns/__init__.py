"""The shared library of the edge Unified Namespace: topics, payloads, config, bus, runtime.

Services import from here only::

    from uns import DevicePath, DeviceData, Metric, Node, Service, ServiceSettings
"""

from uns.bus import Bus, Message, Will, connect
from uns.config import BrokerSettings, LoadedConfig, UnsConfig, load
from uns.errors import BusError, ConfigError, PayloadError, Reject, TopicError, UnsError
from uns.payloads import (
    SCHEMA_VERSION,
    Command,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    Event,
    Metric,
    MetricDef,
    ModelRef,
    NodeBirth,
    NodeDeath,
    Payload,
    Reply,
    SignalWindow,
    Waveform,
    Window,
    decode,
    encode,
    now_ms,
)
from uns.runtime import Inbound, Node, Service, ServiceSettings, Throttled
from uns.topics import DevicePath, DeviceTopic, NodeTopic, device_filter, matches, node_topic, parse

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "BrokerSettings",
    "Bus",
    "BusError",
    "Command",
    "ConfigError",
    "DeviceBirth",
    "DeviceData",
    "DeviceDeath",
    "DevicePath",
    "DeviceTopic",
    "Event",
    "Inbound",
    "LoadedConfig",
    "Message",
    "Metric",
    "MetricDef",
    "ModelRef",
    "Node",
    "NodeBirth",
    "NodeDeath",
    "NodeTopic",
    "Payload",
    "PayloadError",
    "Reject",
    "Reply",
    "Service",
    "ServiceSettings",
    "SignalWindow",
    "Throttled",
    "TopicError",
    "UnsConfig",
    "UnsError",
    "Waveform",
    "Will",
    "Window",
    "connect",
    "decode",
    "device_filter",
    "encode",
    "load",
    "matches",
    "node_topic",
    "now_ms",
    "parse",
]
