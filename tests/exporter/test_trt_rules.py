"""The TensorRT rules check on hand-built graphs: one that passes, and each rule broken alone (int4 weight-only
and INT8 Q/DQ)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from faircalib.exporter.trt_rules import check_tensorrt

K, N = 128, 64


def gemm_model(nodes, inits):
    """An opset-21 model of ``nodes`` from x [B, K] to y [B, N], both fp16."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", N])],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def graph(
    weight_type=TensorProto.INT4, dims=(K, N), scale_type=TensorProto.FLOAT16, axis=0, block=64,
    zero=None, transpose=False, consumer="MatMul", weight_first=False, act_int4=False,
):  # fmt: skip
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=dims) if weight_type == TensorProto.INT4 else rng.integers(0, 16, size=dims)
    weight = helper.make_tensor("w", weight_type, dims, codes.flatten().tolist())
    scale_dims = list(dims)
    scale_dims[axis] = max(1, dims[axis] // block)
    scale = helper.make_tensor("s", scale_type, scale_dims, np.ones(scale_dims).flatten().tolist())
    inits = [weight, scale]
    dq_inputs = ["w", "s"]
    if zero is not None:
        inits.append(helper.make_tensor("z", weight_type, scale_dims, [zero] * int(np.prod(scale_dims))))
        dq_inputs.append("z")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["wd"], name="dq", axis=axis, block_size=block)]
    weight_out = "wd"
    if transpose:
        nodes.append(helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]))
        weight_out = "wt"
    x = "x"
    if act_int4:
        inits += [
            helper.make_tensor("as", TensorProto.FLOAT16, [], [1.0]),
            helper.make_tensor("az", TensorProto.INT4, [], [0]),
        ]
        nodes += [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"], name="q_act"),
                  helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="dq_act")]  # fmt: skip
        x = "xd"
    operands = [weight_out, x] if weight_first else [x, weight_out]
    nodes.append(helper.make_node(consumer, operands, ["y"], name="gemm"))
    return gemm_model(nodes, inits)


def rules(model):
    return [v.rule for v in check_tensorrt(model)]


def test_a_conforming_graph_passes_and_is_valid_onnx():
    model = graph()
    onnx.checker.check_model(model, full_check=True)
    assert rules(model) == []
    assert rules(graph(zero=0)) == []  # an explicit all-zero point is fine
    assert rules(graph(dims=(N, K), axis=1, transpose=True)) == []  # stored [N, K], transposed into MatMul


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        (dict(weight_type=TensorProto.UINT4), "signed INT4 weights"),
        (dict(zero=3), "zero point absent or zero"),
        (dict(block=32), "block size 64 or 128"),
        (dict(scale_type=TensorProto.FLOAT), "fp16/bf16 scales"),
        (dict(axis=1), "blocked along K"),
        (dict(dims=(K, N - 1), axis=0), "even last dimension"),
        (dict(consumer="Add"), "feeds MatMul/Gemm directly or through one Transpose"),
        (dict(weight_first=True), "weight operand of the GEMM"),
        (dict(act_int4=True), "no INT4 activations"),
    ],
)
def test_each_rule_is_enforced(kwargs, rule):
    assert rule in rules(graph(**kwargs))


def test_per_channel_is_not_blocked():
    model = graph()
    scale = next(i for i in model.graph.initializer if i.name == "s")
    scale.CopyFrom(helper.make_tensor("s", TensorProto.FLOAT16, [N], [1.0] * N))
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("axis", 1)])
    assert "blocked quantization" in rules(model)


def int8_graph(
    weight_type=TensorProto.INT8, scale_dims=(N,), axis=1, act_scale_dims=(), act_zero=0, act_scale_const=True
):
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- INT8 W [K, N]."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", weight_type, [K, N], rng.integers(0, 100, size=(K, N)).flatten().tolist())
    scale = helper.make_tensor("s", TensorProto.FLOAT16, list(scale_dims), [0.1] * int(np.prod(scale_dims)))
    inits = [
        weight,
        scale,
        helper.make_tensor("az", TensorProto.INT8, list(act_scale_dims), [act_zero] * int(np.prod(act_scale_dims))),
    ]
    nodes = []
    if act_scale_const:
        inits.append(
            helper.make_tensor("as", TensorProto.FLOAT16, list(act_scale_dims), [0.05] * int(np.prod(act_scale_dims)))
        )
    else:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["as"], keepdims=0))
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"], name="q_act"),
        helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", axis=axis),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="gemm"),
    ]
    return gemm_model(nodes, inits)


def test_a_conforming_int8_graph_passes_and_is_valid_onnx():
    model = int8_graph()
    onnx.checker.check_model(model, full_check=True)
    assert rules(model) == []
    assert rules(int8_graph(scale_dims=())) == []  # one weight scale per tensor


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        (dict(weight_type=TensorProto.UINT8), "signed INT8 weights"),
        (dict(scale_dims=(K,), axis=0), "per-channel along N"),
        (dict(act_scale_dims=(K,)), "per-tensor activation scale"),
        (dict(act_zero=3), "zero point absent or zero"),
        (dict(act_scale_const=False), "constant scales"),
    ],
)
def test_each_int8_rule_is_enforced(kwargs, rule):
    assert rule in rules(int8_graph(**kwargs))


def test_check_onnx_cli(tmp_path, capsys):
    from faircalib.cli import main

    onnx.save(graph(), str(tmp_path / "ok.onnx"))
    onnx.save(graph(block=32), str(tmp_path / "bad.onnx"))
    assert main(["check-onnx", str(tmp_path / "ok.onnx")]) == 0
    assert main(["check-onnx", str(tmp_path / "bad.onnx")]) == 1
    assert "block size 64 or 128" in capsys.readouterr().out
    assert main(["check-onnx", str(tmp_path / "missing.onnx")]) == 2
