"""``uns run inference``: ONNX anomaly and RUL scores of features, one event per fault.

Models are trained from recordings (``uns record``, ``uns model train``), signed
(``uns model sign``) and promoted (``uns model promote``); the service checks each
one's sha256 and Ed25519 signature before loading it and hot-loads promotions. See
`uns_inference.service`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uns_inference.settings import InferenceSettings, ThresholdOverrides

if TYPE_CHECKING:
    from uns_inference.service import Inference

__all__ = ["Inference", "InferenceSettings", "ThresholdOverrides"]


def __getattr__(name: str) -> Any:
    # The service (onnxruntime, numpy) is imported when it is asked for, so `uns record`
    # and `uns audit verify` start and exit without them (seconds on a loaded box).
    if name == "Inference":
        from uns_inference.service import Inference

        return Inference
    raise AttributeError(f"module 'uns_inference' has no attribute {name!r}")
