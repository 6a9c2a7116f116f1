"""Fitted numpy models as ONNX graphs of standard operators (the only module importing onnx).

Everything a model computes is in its graph, so the runtime is just onnxruntime:
the log of energy features, the standardisation, the projection, the residual, the
score and the contributions. The input is ``features``, float32 [N, F]; inside, the
graph computes in float64 (Cast in, Cast out), so it agrees with the numpy reference
to far better than 1e-4. Outputs are float32 [N] (and [N, F] for contributions).

The bytes are reproducible: fixed opset and IR version, fixed producer, no
timestamps, deterministic protobuf serialisation; same fitted numbers, same sha256.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from uns_inference.train import AnomalyModel, RulModel, Transform

OPSET: Final = 17
IR_VERSION: Final = 8
PRODUCER: Final = "uns-inference"
PRODUCER_VERSION: Final = "1"
"""The graph format's version, not the package's: a new package must not change bytes."""
INPUT: Final = "features"


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: NDArray[np.generic]) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=f"n{self._n}_{op_type}", **attrs)
        )
        return out

    def model(
        self,
        name: str,
        n_features: int,
        outputs: list[tuple[str, list[str | int]]],
        metadata: dict[str, str],
    ) -> bytes:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n_features])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version=PRODUCER_VERSION,
        )
        model.ir_version = IR_VERSION
        model.model_version = 1
        for key, value in sorted(metadata.items()):
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = value
        onnx.checker.check_model(model, full_check=True)
        data: bytes = model.SerializeToString(deterministic=True)
        return data


def _transform(g: _Graph, transform: Transform) -> str:
    """features (float32) -> standardised z (float64)."""
    x = g.op("Cast", [INPUT], "x64", to=TensorProto.DOUBLE)
    if transform.log.any():
        pos = g.op("Max", [x, g.const("zero", np.zeros((), np.float64))])
        shifted = g.op("Add", [pos, g.const("log_offsets", transform.offsets.astype(np.float64))])
        logged = g.op("Log", [shifted])
        x = g.op("Where", [g.const("log_mask", transform.log.astype(np.bool_)), logged, x], "xt")
    centred = g.op("Sub", [x, g.const("means", transform.means.astype(np.float64))])
    return g.op("Div", [centred, g.const("stds", transform.stds.astype(np.float64))], "z")


def anomaly_onnx(model: AnomalyModel) -> bytes:
    """Outputs ``score`` [N] and ``contributions`` [N, F] (their row sums are the score)."""
    g = _Graph()
    z = _transform(g, model.transform)
    a = g.op("MatMul", [z, g.const("t2_map", model.t2_map.astype(np.float64))], "t2_part")
    b = g.op("MatMul", [z, g.const("spe_map", model.spe_map.astype(np.float64))], "spe_part")
    contrib = g.op("Add", [g.op("Mul", [a, a]), g.op("Mul", [b, b])], "contrib64")
    total = g.op(
        "ReduceSum", [contrib, g.const("axis1", np.array([1], np.int64))], "score64", keepdims=0
    )
    g.op("Cast", [total], "score", to=TensorProto.FLOAT)
    g.op("Cast", [contrib], "contributions", to=TensorProto.FLOAT)
    f = len(model.features)
    return g.model(
        "uns_anomaly",
        f,
        [("score", ["N"]), ("contributions", ["N", f])],
        {"uns.kind": "anomaly", "uns.features": ",".join(model.features)},
    )


def rul_onnx(model: RulModel) -> bytes:
    """Outputs ``rul``, ``rul_lower``, ``rul_upper`` [N], each clipped to [0, cap]."""
    g = _Graph()
    z = _transform(g, model.transform)
    weighted = g.op("Mul", [z, g.const("coef", model.coef.astype(np.float64))])
    axis = g.const("axis1", np.array([1], np.int64))
    raw = g.op(
        "Add",
        [
            g.op("ReduceSum", [weighted, axis], keepdims=0),
            g.const("intercept", np.array(model.intercept, np.float64)),
        ],
        "rul_raw",
    )
    zero = g.const("zero_rul", np.zeros((), np.float64))
    cap = g.const("cap", np.array(model.cap, np.float64))
    for out, offset in (("rul", 0.0), ("rul_lower", model.lower), ("rul_upper", model.upper)):
        value = raw
        if offset:
            value = g.op("Add", [raw, g.const(f"{out}_offset", np.array(offset, np.float64))])
        clipped = g.op("Min", [g.op("Max", [value, zero]), cap])
        g.op("Cast", [clipped], out, to=TensorProto.FLOAT)
    return g.model(
        "uns_rul",
        len(model.features),
        [("rul", ["N"]), ("rul_lower", ["N"]), ("rul_upper", ["N"])],
        {"uns.kind": "rul", "uns.features": ",".join(model.features)},
    )
