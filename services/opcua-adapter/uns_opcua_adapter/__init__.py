"""``uns run opcua-adapter``: an OPC UA server's variables as raw device data.

Subscribes (never polls) to the configured tags of every device under
``services.opcua-adapter`` and publishes ``<device>/raw/birth`` (units, ranges,
NodeIds), then ``<device>/raw/data`` once per publishing cycle with each value's
SourceTimestamp and OPC UA quality; array nodes of ``waveform`` tags travel as one
block per message. A lost server is a ``raw/death`` for every device, then a
reconnect with backoff and births again. ``browse`` writes a starter config,
``create_certificate`` the client certificate a PLC is to trust.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_opcua_adapter.browsing import BrowseError, browse
    from uns_opcua_adapter.certificate import CertificateError, MadeCertificate, create_certificate
    from uns_opcua_adapter.certificate import describe as describe_certificate
    from uns_opcua_adapter.service import OpcUaAdapter
    from uns_opcua_adapter.settings import OpcUaAdapterSettings, Security, Tag, UaDevice

__all__ = [
    "BrowseError",
    "CertificateError",
    "MadeCertificate",
    "OpcUaAdapter",
    "OpcUaAdapterSettings",
    "Security",
    "Tag",
    "UaDevice",
    "browse",
    "create_certificate",
    "describe_certificate",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "BrowseError": "browsing",
        "CertificateError": "certificate",
        "MadeCertificate": "certificate",
        "OpcUaAdapter": "service",
        "OpcUaAdapterSettings": "settings",
        "Security": "settings",
        "Tag": "settings",
        "UaDevice": "settings",
        "browse": "browsing",
        "create_certificate": "certificate",
        "describe_certificate": "certificate:describe",
    },
)
