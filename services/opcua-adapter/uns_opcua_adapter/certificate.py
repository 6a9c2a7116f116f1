"""``uns opcua cert``: the adapter's OPC UA application instance certificate and its key.

A server accepts a client certificate only when it is trusted (usually by hand, on the
PLC) and fits what OPC UA Part 6 asks of it: RSA 2048 with SHA-256 (Basic256Sha256), the
client's application URI as a URI in subjectAltName (the server compares it with the one
the session announces; the adapter announces the certificate's, so they always agree),
this host's names, and the key usages digitalSignature, nonRepudiation,
keyEncipherment, dataEncipherment with the extended usage clientAuth. Self-signed, so
the PLC trusts exactly this certificate (no CA to manage on a single edge box).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from uns.errors import UnsError


class CertificateError(UnsError):
    """The certificate could not be written; the message says why (for the command line)."""


@dataclass(frozen=True, slots=True)
class MadeCertificate:
    certificate: Path
    private_key: Path
    application_uri: str
    thumbprint: str
    """SHA-1 of the DER certificate, as PLC web pages and TIA Portal show it."""
    not_after: dt.datetime


def default_application_uri(hostname: str | None = None) -> str:
    """``urn:<host>:uns:opcua-adapter``: unique per box, as OPC UA wants application URIs."""
    return f"urn:{hostname or socket.gethostname()}:uns:opcua-adapter"


def create_certificate(
    certificate: Path,
    private_key: Path,
    *,
    application_uri: str | None = None,
    hostnames: list[str] | None = None,
    common_name: str = "uns opcua-adapter",
    days: int = 3650,
    server: bool = False,
    overwrite: bool = False,
) -> MadeCertificate:
    """Write a self-signed certificate (DER, which PLCs import) and its key (PEM, mode 0600).

    ``hostnames`` are DNS names or IP addresses for subjectAltName (this host's name
    when absent). ``server`` adds serverAuth (for a test server). Raises
    `CertificateError` when a file exists (unless ``overwrite``) or cannot be written.
    """
    if days < 1:
        raise CertificateError(f"--days: {days} is not a positive number of days")
    uri = application_uri or default_application_uri()
    if ":" not in uri:
        raise CertificateError(f"--uri: {uri!r} is not a URI (write e.g. urn:edge-01:uns)")
    if not overwrite:
        for path in (certificate, private_key):
            if path.exists():
                raise CertificateError(f"{path} exists (pass --force to replace it)")
    names = hostnames or [socket.gethostname()]
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a PLC whose clock is a bit behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        # CA:TRUE with keyCertSign, as asyncua and most OPC UA stacks make self-signed
        # application certificates: some servers verify a self-signed one as its own issuer
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    try:
        for path in (certificate, private_key):
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem_key)
        os.chmod(private_key, 0o600)  # an existing file keeps its mode through O_TRUNC
        certificate.write_bytes(der)
    except OSError as exc:
        raise CertificateError(f"cannot write {exc.filename}: {exc.strerror}") from None
    return MadeCertificate(
        certificate=certificate,
        private_key=private_key,
        application_uri=uri,
        thumbprint=hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
        not_after=cert.not_valid_after_utc,
    )


def describe(made: MadeCertificate) -> str:
    """What ``uns opcua cert`` prints: the files, and the next steps on the PLC."""
    return "\n".join(
        [
            f"certificate     {made.certificate}  (DER: import this on the PLC)",
            f"private key     {made.private_key}  (PEM, mode 0600: stays on this box)",
            f"application URI {made.application_uri}",
            f"SHA-1 thumbprint {made.thumbprint}  (compare it on the PLC before trusting)",
            f"valid until     {made.not_after:%Y-%m-%d}",
            "",
            "Next: trust the certificate on the PLC (README: opcua-adapter, Trusting the"
            " adapter's certificate), then set in plant.yaml:",
            "  services.opcua-adapter.security:",
            "    mode: sign_encrypt",
            f"    certificate: {made.certificate}",
            f"    private_key: {made.private_key}",
        ]
    )
