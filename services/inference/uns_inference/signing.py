"""Integrity of a model directory: sha256 digests and Ed25519 signatures.

A model directory holds ``model.onnx``, ``card.json`` (whose ``sha256`` field is the
digest of ``model.onnx``) and ``model.onnx.sig``: the base64 Ed25519 signature of
`signed_message`, a short text naming the digests of both files. So the signature
covers the graph *and* the card (thresholds, feature order): changing either one
breaks it. Keys are PEM files: PKCS#8 private key (mode 0600), SubjectPublicKeyInfo
public key, made by `generate_keypair` (``uns model keygen``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from uns.errors import UnsError

MODEL_FILE: Final = "model.onnx"
CARD_FILE: Final = "card.json"
SIG_FILE: Final = "model.onnx.sig"
_DOMAIN: Final = b"uns-model-signature-v1\n"


class IntegrityError(UnsError):
    """A model, its card or its signature does not check out; the message says which."""


class SignatureError(IntegrityError):
    """No signature, no key to check it, or a signature that does not verify."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def signed_message(model_sha256: str, card_sha256: str) -> bytes:
    """What is signed: a domain tag and the digests of both files (never the raw bytes)."""
    return _DOMAIN + f"model.onnx sha256={model_sha256}\ncard.json sha256={card_sha256}\n".encode()


def generate_keypair(prefix: Path) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub``; refuse to overwrite."""
    key_path = prefix.with_name(prefix.name + ".key")
    pub_path = prefix.with_name(prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise IntegrityError(f"{path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise IntegrityError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise IntegrityError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path}: not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, model_sha256: str, card_sha256: str) -> bytes:
    """The signature file's content: base64 of the Ed25519 signature, one line."""
    signature = key.sign(signed_message(model_sha256, card_sha256))
    return base64.b64encode(signature) + b"\n"


def verify(
    key: Ed25519PublicKey, signature_file: bytes, model_sha256: str, card_sha256: str
) -> None:
    """Raise `IntegrityError` unless ``signature_file`` signs these digests with ``key``."""
    try:
        signature = base64.b64decode(signature_file.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{SIG_FILE} is not base64") from None
    try:
        key.verify(signature, signed_message(model_sha256, card_sha256))
    except InvalidSignature:
        raise SignatureError(
            "bad signature: the model or its card was changed after signing, or another key"
            " signed it"
        ) from None
