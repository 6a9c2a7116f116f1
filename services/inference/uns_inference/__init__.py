"""``uns run inference``: ONNX anomaly and RUL scores of features, one event per fault.

Models are trained from recordings (``uns record``, ``uns model train``), signed
(``uns model sign``) and promoted (``uns model promote``); the service checks each
one's sha256 and Ed25519 signature before loading it and hot-loads promotions. See
`uns_inference.service`.
"""

from uns_inference.service import Inference
from uns_inference.settings import InferenceSettings, ThresholdOverrides

__all__ = ["Inference", "InferenceSettings", "ThresholdOverrides"]
