"""`uns opcua cert`: the client certificate a PLC is to trust, made in one command."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509

from clitools import uns

pytestmark = pytest.mark.integration


def test_opcua_cert_writes_a_der_certificate_and_a_private_key_only_root_can_read(tmp_path):
    cert, key = tmp_path / "pki" / "edge.der", tmp_path / "pki" / "edge.key.pem"
    r = uns("opcua", "cert", "--out", str(cert), "--key", str(key), "--uri", "urn:edge-01:uns")
    assert r.returncode == 0, r.stderr
    assert "thumbprint" in r.stdout
    made = x509.load_der_x509_certificate(cert.read_bytes())
    uris = made.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:edge-01:uns" in uris.get_values_for_type(x509.UniformResourceIdentifier)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = uns("opcua", "cert", "--out", str(cert), "--key", str(key))
    assert again.returncode == 2
    assert "--force" in again.stderr
