"""Graph-to-graph passes over the exported ONNX of a fake-quant student (the way NVIDIA modelopt exports):
quantized weights as codes behind DequantizeLinear and weights transposed as they are written (on the exporter's
``onnx_ir`` graph, before constant folding), fp16 activation quantizers and one Q/DQ pair per reader (on the
proto)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper, numpy_helper

from faircalib.calib.linear import QuantizedWeight, QuantLinear
from faircalib.errors import ConfigError
from faircalib.exporter.graph import activation_qdq_pairs, consumers
from faircalib.models.base import Denoiser


@dataclass(frozen=True)
class TracedWeight:
    """A quantized linear's weight as the traced graph reads it: ``key`` its layer, ``quantized`` its codes;
    ``scaled_after``: the initializer holds the centred codes W^T [K, N] (per-token quantized activations take
    the product on codes and scale afterwards), read through a Cast to float; otherwise it holds W [N, K],
    read through a Transpose to W^T."""

    key: str
    quantized: QuantizedWeight
    scaled_after: bool


def traced_weights(student: Denoiser) -> dict[str, TracedWeight]:
    """Initializer name (the weight buffer's qualified name, as the exporter names it) -> the quantized
    linear whose weight it holds, for every quantized linear of ``student``."""
    module_names = {id(module): name for name, module in student.named_modules()}
    weights = {}
    for index, block in enumerate(student.blocks):
        for group in student.linear_groups():
            for name in group:
                layer = block.get_submodule(name)
                if not isinstance(layer, QuantLinear):
                    raise ConfigError(f"blocks.{index}.{name} is not quantized")
                scaled_after = layer.weight is None
                buffer = "weight_codes" if scaled_after else "weight"
                weights[f"{module_names[id(layer)]}.{buffer}"] = TracedWeight(
                    f"blocks.{index}.{name}", layer.quantized, scaled_after
                )
    return weights


_CODE_TYPES = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4, (8, True): ir.DataType.INT8,
               (8, False): ir.DataType.UINT8}  # fmt: skip


def _integer_array(codes: torch.Tensor, bits: int, signed: bool) -> np.ndarray:
    values = codes.cpu().numpy()
    if bits == 4:
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return values.astype(np.int8 if signed else np.uint8)


def dequantize_weights(graph: ir.Graph, weights: dict[str, TracedWeight], scale_dtype: np.dtype) -> int:
    """Put each quantized linear's codes behind a DequantizeLinear that makes W^T [K, N] where the traced graph
    made it from the weight initializer (by its Transpose, or by the Cast of the centred codes), and drop that
    initializer: the float weights the student was traced with (placeholders, see ``QuantLinear``) never reach
    the file, and the codes come straight from the artifact. Runs before constant folding, which would copy
    every transposed weight. Returns how many initializers were replaced."""
    for name, weight in weights.items():
        value = graph.initializers.get(name)
        if value is None:
            raise ConfigError(f"the exported graph has no weight initializer for {weight.key}")
        readers = value.consumers()
        expected = "Cast" if weight.scaled_after else "Transpose"
        if not readers or any(node.op_type != expected for node in readers):
            raise ConfigError(f"the exported graph reads {weight.key}'s weight other than by a {expected}")
        made = _dequantize(graph, weight, scale_dtype)
        for node in readers:
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and to.as_int() != made.dtype:
                node.replace_input_with(0, made)  # the codes go on to another float type
                continue
            node.outputs[0].replace_all_uses_with(made, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        graph.initializers.pop(name)
    return len(weights)


def _dequantize(graph: ir.Graph, weight: TracedWeight, scale_dtype: np.dtype) -> ir.Value:
    """The initializers and the DequantizeLinear that make one layer's W^T [K, N] (the centred codes, unit
    scales, when ``scaled_after``): blocked along K for group-wise weights, per output channel otherwise."""
    q = weight.quantized
    prefix = weight.key.replace(".", "_")
    group = q.codes.shape[1] // q.scale.shape[1]
    blocked = q.spec.group_size is not None  # even a single group: TensorRT takes blocked DQ only
    scale = q.scale.T.contiguous().numpy() if blocked else q.scale[:, 0].numpy()  # [G, N] or [N]
    if weight.scaled_after:
        scale = np.ones_like(scale)
    # the codes are made as they are written: the graph holds no second copy of every layer's codes
    codes = ir.LazyTensor(
        lambda: ir.tensor(_integer_array(q.codes.T.contiguous(), q.spec.bits, q.spec.symmetric)),
        _CODE_TYPES[q.spec.bits, q.spec.symmetric], ir.Shape(q.codes.shape[::-1]), name=f"{prefix}_codes",
    )  # fmt: skip
    tensors = [codes, ir.tensor(scale.astype(scale_dtype), name=f"{prefix}_scale")]
    if q.zero is not None:
        zero = q.zero.T.contiguous() if blocked else q.zero[:, 0]
        tensors.append(ir.tensor(_integer_array(zero.round(), q.spec.bits, False), name=f"{prefix}_zero"))
    inputs = []
    for tensor in tensors:
        inputs.append(ir.val(tensor.name, tensor.dtype, tensor.shape, const_value=tensor))
        graph.register_initializer(inputs[-1])
    attrs = {"axis": 0, "block_size": group} if blocked else {"axis": 1}
    node = ir.node("DequantizeLinear", inputs, attrs, name=f"{prefix}_dequantize")
    node.outputs[0].name = f"{prefix}_dequantized"
    node.outputs[0].dtype = inputs[1].dtype
    node.outputs[0].shape = codes.shape
    graph.insert_before(graph.node(0), node)
    return node.outputs[0]


def lazy_transposes(graph: ir.Graph) -> int:
    """Replace each Transpose of a 2-D initializer that only it reads by an initializer that transposes when it
    is written: constant folding would hold a transposed copy of every such weight (every full-precision
    linear) until the model is saved. Returns how many were replaced."""
    replaced = 0
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        tensor = source.const_value if source is not None and source.is_initializer() else None
        perm = node.attributes.get("perm")
        if tensor is None or len(tensor.shape) != 2 or len(source.uses()) != 1:
            continue
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        name = node.outputs[0].name
        shape = ir.Shape(list(reversed(tensor.shape.dims)))
        lazy = ir.LazyTensor(lambda t=tensor: ir.tensor(np.ascontiguousarray(t.numpy().T)), tensor.dtype, shape,
                             name=name)  # fmt: skip
        value = ir.val(name, tensor.dtype, shape, const_value=lazy)
        node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        graph.register_initializer(value)
        replaced += 1
    return replaced


def half_precision_activation_qdq(model: onnx.ModelProto) -> int:
    """Give every activation QuantizeLinear -> DequantizeLinear pair fp16 scales and drop the Cast back
    to fp16 behind it: the exporter keeps float32 scales on fp16 activations, which ONNX (and TensorRT)
    refuse, since a quantizer's scale takes its input's type. Returns how many pairs changed."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = consumers(graph)
    changed = 0
    for quantize, dequantize in list(activation_qdq_pairs(graph, readers)):
        casts = readers.get(dequantize.output[0], [])
        to_half = [c for c in casts if c.op_type == "Cast" and helper.get_attribute_value(c.attribute[0]) == 10]
        if not casts or len(to_half) != len(casts):
            continue
        for name in {quantize.input[1], dequantize.input[1]}:
            scale = initializers[name]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16), name))
        for cast in to_half:
            for user in readers.get(cast.output[0], []):
                user.input[:] = [dequantize.output[0] if i == cast.output[0] else i for i in user.input]
            graph.node.remove(cast)
        changed += 1
    if changed:
        del graph.value_info[:]  # recorded float32 types for what is fp16 now; shape inference redoes it
    return changed


def dedicated_activation_qdq(model: onnx.ModelProto) -> int:
    """Give each consumer of a shared activation QuantizeLinear -> DequantizeLinear pair its own pair,
    with its own copies of the scale and zero-point (the exporter merges the identical quantizers of q, k
    and v, which read one tensor). ONNX Runtime turns DequantizeLinear -> MatMul into an integer GEMM only
    when the pair serves that one MatMul, and its common-subexpression pass would merge pairs that share
    their scale names. Returns how many pairs were added."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = consumers(graph)
    added = 0
    for quantize, dequantize in list(activation_qdq_pairs(graph, readers)):
        position = list(graph.node).index(dequantize) + 1
        for user in readers.get(dequantize.output[0], [])[1:]:
            added += 1
            tag = f"_{added}"
            params = []
            for name in quantize.input[1:]:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = name + tag
                graph.initializer.append(copy)
                params.append(copy.name)
            codes, value = quantize.output[0] + tag, dequantize.output[0] + tag
            nodes = [
                helper.make_node("QuantizeLinear", [quantize.input[0], *params], [codes], name=quantize.name + tag),
                helper.make_node("DequantizeLinear", [codes, *params], [value], name=dequantize.name + tag),
            ]
            for offset, node in enumerate(nodes):
                graph.node.insert(position + offset, node)
            user.input[:] = [value if name == dequantize.output[0] else name for name in user.input]
    return added
