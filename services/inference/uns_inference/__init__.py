"""``uns run inference``: ONNX anomaly and RUL scores of features, one event per fault.

Models are trained from recordings (``uns record``, ``uns model train``), signed
(``uns model sign``) and promoted (``uns model promote``); the service checks each
one's sha256 and Ed25519 signature before loading it and hot-loads promotions. See
`uns_inference.service`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_inference.cli import (
        CommandError,
        audit_verify,
        model_info,
        model_keygen,
        model_promote,
        model_sign,
        model_train,
        model_verify,
        record_messages,
    )
    from uns_inference.options import TRAINING, Training
    from uns_inference.service import Inference
    from uns_inference.settings import InferenceSettings, ThresholdOverrides

__all__ = [
    "TRAINING",
    "CommandError",
    "Inference",
    "InferenceSettings",
    "ThresholdOverrides",
    "Training",
    "audit_verify",
    "model_info",
    "model_keygen",
    "model_promote",
    "model_sign",
    "model_train",
    "model_verify",
    "record_messages",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "TRAINING": "options",
        "CommandError": "cli",
        "Inference": "service",
        "InferenceSettings": "settings",
        "ThresholdOverrides": "settings",
        "Training": "options",
        "audit_verify": "cli",
        "model_info": "cli",
        "model_keygen": "cli",
        "model_promote": "cli",
        "model_sign": "cli",
        "model_train": "cli",
        "model_verify": "cli",
        "record_messages": "cli",
    },
)
