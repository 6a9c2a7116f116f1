"""Load a verified model and run it (the only module importing onnxruntime).

`load` reads ``model.onnx``, ``card.json`` and ``model.onnx.sig`` once, checks the
bytes it read (sha256 against the card, Ed25519 signature over both digests), and
only then hands *those same bytes* to onnxruntime: a file swapped between the check
and the load cannot slip through. Everything here blocks: call it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from numpy.typing import NDArray
from onnxruntime.capi import onnxruntime_pybind11_state as _state  # type: ignore[import-untyped]

from uns.errors import UnsError
from uns_inference import card as cards
from uns_inference import signing
from uns_inference.signing import CARD_FILE, MODEL_FILE, SIG_FILE, IntegrityError, SignatureError


class ModelError(UnsError):
    """A model that passed its checks but cannot be run (bad graph, wrong inputs)."""


# onnxruntime's own exceptions (they derive from Exception directly)
_ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NoModel",
        "NotImplemented",
        "RuntimeException",
        "EngineError",
        "EPFail",
    )
    if hasattr(_state, name)
)


@dataclass(frozen=True)
class Verified:
    """The bytes of a model directory, checked."""

    directory: Path
    card: cards.Card
    model_bytes: bytes
    sha256: str
    signed: bool


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path.name} is missing") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: {exc.strerror or exc}") from None


def verify(
    directory: Path, pubkey: Ed25519PublicKey | None, *, allow_unsigned: bool = False
) -> Verified:
    """Check a model directory; raise `IntegrityError` (or `CardError`) saying what is wrong.

    Without a signature file the model is refused unless ``allow_unsigned``; with one,
    it must verify against ``pubkey`` (refused when there is no key, unless
    ``allow_unsigned``: then the signature cannot be checked and is ignored).
    """
    model_bytes = _read(directory / MODEL_FILE)
    card_bytes = _read(directory / CARD_FILE)
    sha = signing.sha256_bytes(model_bytes)
    card = cards.decode(card_bytes, str(directory / CARD_FILE))
    if card.sha256 != sha:
        raise IntegrityError(
            f"sha256 mismatch: {MODEL_FILE} is {sha[:12]}…, its card says {card.sha256[:12]}…"
        )
    sig_path = directory / SIG_FILE
    signed = sig_path.exists()
    if not signed:
        if not allow_unsigned:
            raise SignatureError(
                f"unsigned: no {SIG_FILE} (sign it with `uns model sign`; allow_unsigned is"
                " for development only)"
            )
    elif pubkey is not None:
        signing.verify(pubkey, _read(sig_path), sha, signing.sha256_bytes(card_bytes))
    elif not allow_unsigned:
        raise SignatureError("no public key configured to check the signature (pubkey)")
    else:
        signed = False
    return Verified(directory, card, model_bytes, sha, signed)


class OnnxModel:
    """A verified model in an onnxruntime session: ``run`` takes float32 rows [N, F]."""

    def __init__(self, verified: Verified) -> None:
        self.verified = verified
        self.card = verified.card
        self.sha256 = verified.sha256
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # tiny graphs: threads cost more than they give
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                verified.model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except _ORT_ERRORS as exc:
            raise ModelError(f"onnxruntime cannot load {MODEL_FILE}: {exc}") from None
        inputs = self.session.get_inputs()
        n = len(self.card.features)
        if len(inputs) != 1 or inputs[0].name != "features" or inputs[0].shape[-1] != n:
            raise ModelError(
                f"the graph's input is not features[N, {n}] as the card says:"
                f" {[(i.name, i.shape) for i in inputs]}"
            )
        names = {o.name for o in self.session.get_outputs()}
        missing = [o for o in self.card.outputs if o not in names]
        if missing:
            raise ModelError(f"the graph lacks the outputs {', '.join(missing)} named by the card")

    def run(self, rows: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        values: list[Any] = self.session.run(self.card.outputs, {"features": x})
        return {name: np.asarray(v) for name, v in zip(self.card.outputs, values, strict=True)}


def load(
    directory: Path, pubkey: Ed25519PublicKey | None, *, allow_unsigned: bool = False
) -> OnnxModel:
    """Verify, then load. Blocking."""
    return OnnxModel(verify(directory, pubkey, allow_unsigned=allow_unsigned))
