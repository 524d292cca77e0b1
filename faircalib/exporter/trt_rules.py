"""A static check of an ONNX graph against what TensorRT needs to build its quantized GEMMs: int4
weight-only and INT8 Q/DQ (docs/DESIGN.md, "Export rules"), so every machine can test what only a GPU can build.

For each DequantizeLinear whose input is a 4-bit weight:
- the input is a constant initializer of signed INT4 (TensorRT has no UINT4 weights, no INT4 activations);
- the zero point is absent or all zeros;
- quantization is blocked (scale of the same rank as the weight) along one dimension, the last or second
  to last, with block size 64 or 128, and that dimension is the GEMM's K;
- the weight's last dimension is even;
- scales are float16 or bfloat16;
- the output feeds MatMul/Gemm as its weight operand directly or through one Transpose.

For each DequantizeLinear whose input is an 8-bit weight: signed INT8, zero point absent or zero, a
constant scale per tensor or per output channel (1-D along N, never along K), feeding a GEMM as above.
For each QuantizeLinear (activations): a constant per-tensor (scalar) scale, a zero zero point, no INT4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from faircalib.exporter.graph import consumers

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)
EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)
HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
GEMMS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule} ({self.detail})"


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def check_tensorrt(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Every violation of the rules above in ``model`` (empty: TensorRT can build its quantized GEMMs)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = consumers(graph)
    violations: list[Violation] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            violations.extend(_check_activation_quantizer(node, initializers))
        if node.op_type != "DequantizeLinear":
            continue
        weight = initializers.get(node.input[0])
        if weight is None:
            continue  # an activation's dequantizer: its QuantizeLinear is checked
        name = node.name or node.output[0]
        if weight.data_type in EIGHT_BIT:
            violations.extend(_check_int8_weight(name, node, weight, initializers, readers))
        elif weight.data_type in FOUR_BIT:
            violations.extend(_check_int4_weight(name, node, weight, initializers, readers))
    return violations


def _check_int4_weight(name: str, node: onnx.NodeProto, weight, initializers, readers) -> list[Violation]:
    """TensorRT's int4 weight-only rules for one weight DequantizeLinear."""
    violations, rank = [], len(weight.dims)
    if weight.data_type == TensorProto.UINT4:
        violations.append(Violation(name, "signed INT4 weights", "weight is UINT4"))
    if len(node.input) > 2 and node.input[2]:
        zero = initializers.get(node.input[2])
        if zero is None or numpy_helper.to_array(zero).astype("int32").any():
            violations.append(Violation(name, "zero point absent or zero", "non-zero or non-constant zero point"))
    scale = initializers.get(node.input[1])
    if scale is None:
        return [*violations, Violation(name, "constant scales", "scale is not an initializer")]
    if scale.data_type not in HALF:
        violations.append(Violation(name, "fp16/bf16 scales", f"scale is {TensorProto.DataType.Name(scale.data_type)}"))
    axis = _attr(node, "axis", 1) % max(rank, 1)
    block = _attr(node, "block_size", 0)
    if len(scale.dims) != rank or block == 0:
        violations.append(Violation(name, "blocked quantization", "scale is not blocked (per tensor/axis)"))
    else:
        blocked_dims = [d for d in range(rank) if scale.dims[d] != weight.dims[d]]
        if blocked_dims != [axis]:
            violations.append(Violation(name, "one blocked dimension", f"scale dims {list(scale.dims)}"))
        if axis not in (rank - 1, rank - 2):
            violations.append(Violation(name, "blocked on the last two dimensions", f"axis {axis}"))
        if block not in (64, 128):
            violations.append(Violation(name, "block size 64 or 128", f"block_size {block}"))
    if rank and weight.dims[-1] % 2:
        violations.append(Violation(name, "even last dimension", f"weight dims {list(weight.dims)}"))
    k_axes, problems = _weight_k_axes(name, node, rank, readers)
    violations.extend(problems)
    for k in sorted(k_axes - {axis}):
        violations.append(Violation(name, "blocked along K", f"blocked axis {axis}, K is axis {k}"))
    return violations


def _zero_point_is_zero(node: onnx.NodeProto, initializers) -> bool:
    if len(node.input) < 3 or not node.input[2]:
        return True
    zero = initializers.get(node.input[2])
    return zero is not None and not numpy_helper.to_array(zero).astype("int32").any()


def _check_activation_quantizer(node: onnx.NodeProto, initializers) -> list[Violation]:
    name = node.name or node.output[0]
    zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and zero.data_type in FOUR_BIT:
        return [Violation(name, "no INT4 activations", "QuantizeLinear to 4 bits")]
    out = []
    scale = initializers.get(node.input[1])
    if scale is None:
        out.append(Violation(name, "constant scales", "activation scale is computed at run time"))
    elif len(scale.dims) and any(d != 1 for d in scale.dims):
        out.append(Violation(name, "per-tensor activation scale", f"scale dims {list(scale.dims)}"))
    if not _zero_point_is_zero(node, initializers):
        out.append(Violation(name, "zero point absent or zero", "non-zero or non-constant zero point"))
    return out


def _check_int8_weight(name, node, weight, initializers, readers) -> list[Violation]:
    rank = len(weight.dims)
    out = []
    if weight.data_type == TensorProto.UINT8:
        out.append(Violation(name, "signed INT8 weights", "weight is UINT8"))
    if not _zero_point_is_zero(node, initializers):
        out.append(Violation(name, "zero point absent or zero", "non-zero or non-constant zero point"))
    scale = initializers.get(node.input[1])
    if scale is None:
        return [*out, Violation(name, "constant scales", "scale is not an initializer")]
    axis = _attr(node, "axis", 1) % max(rank, 1)
    if _attr(node, "block_size", 0) or len(scale.dims) > 1:
        out.append(Violation(name, "per-tensor or per-channel INT8 weights", "blocked scale"))
        return out
    k_axes, problems = _weight_k_axes(name, node, rank, readers)
    out.extend(problems)
    if len(scale.dims) == 1 and scale.dims[0] != 1 and axis in k_axes:
        out.append(Violation(name, "per-channel along N", f"scales along axis {axis}, the GEMM's K"))
    return out


def _weight_k_axes(name, node, rank, readers) -> tuple[set[int], list[Violation]]:
    """The axes of the dequantized weight that the GEMMs reading it reduce over (their K), and any
    problem with how it reaches them."""
    source = node.output[0]
    users = readers.get(source, [])
    k_axis = rank - 2  # MatMul(A, B): B is [..., K, N]
    if len(users) == 1 and users[0].op_type == "Transpose":
        perm = list(_attr(users[0], "perm", list(reversed(range(rank)))))
        k_axis = perm[rank - 2]
        source = users[0].output[0]
        users = readers.get(source, [])
    if not users or any(user.op_type not in GEMMS for user in users):
        found = sorted({user.op_type for user in users}) or ["nothing"]
        return set(), [Violation(name, "feeds MatMul/Gemm directly or through one Transpose", f"feeds {found}")]
    axes, problems = set(), []
    for user in users:
        if len(user.input) < 2 or user.input[1] != source:
            problems.append(Violation(name, "weight operand of the GEMM", f"enters {user.op_type} as its first input"))
        elif user.op_type == "Gemm" and _attr(user, "transB", 0):
            axes.add(rank - 1 if k_axis == rank - 2 else rank - 2)
        else:
            axes.add(k_axis)
    return axes, problems
