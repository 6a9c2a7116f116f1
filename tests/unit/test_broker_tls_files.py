"""The local CA and server certificate `uns broker secure` writes, and the embedded
broker's listeners from them: pure, no network (the real handshakes are in
tests/integration/test_broker_tls.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from uns_broker import BrokerServerSettings
from uns_broker.logic import amqtt_config
from uns_broker.tls import write_tls


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_names(tmp_path: Path) -> None:
    tls = write_tls(tmp_path, ["edge-01.plant.local", "10.20.0.5"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-01.plant.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.20.0.5")]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_embedded_broker_adds_a_tls_listener_only_when_asked(tmp_path: Path) -> None:
    tls = write_tls(tmp_path, ["localhost"])
    files = {"certfile": str(tls.server_cert), "keyfile": str(tls.server_key)}
    plain = amqtt_config(BrokerServerSettings(**files))  # type: ignore[arg-type]
    assert list(plain["listeners"]) == ["default"]
    both = amqtt_config(BrokerServerSettings(tls_port=8883, **files))  # type: ignore[arg-type]
    assert both["listeners"]["default"]["bind"] == "127.0.0.1:1883"
    assert both["listeners"]["tls"] == {
        "type": "tcp",
        "bind": "0.0.0.0:8883",
        "max_connections": 0,
        "ssl": True,
        **files,
    }
    with pytest.raises(ValueError, match="tls_port needs certfile"):
        BrokerServerSettings(tls_port=8883)
