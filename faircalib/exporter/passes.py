"""Graph-to-graph passes over the exported ONNX of a fake-quant student (the way NVIDIA modelopt exports):
quantized weight initializers behind DequantizeLinear, fp16 activation quantizers, one Q/DQ pair per reader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from faircalib.calib.linear import QuantizedWeight, QuantLinear
from faircalib.errors import ConfigError
from faircalib.exporter.graph import activation_qdq_pairs, consumers
from faircalib.models.base import Denoiser


@dataclass(frozen=True)
class FoldedWeight:
    """How to recognise W^T [K, N] as the student multiplies it (what the exporter folds into an initializer):
    the sha256 and size of its float32 values, the dequantized weight or, when ``scaled_after`` (per-token
    quantized activations), the centred codes whose scales are applied after the product. Only the digest is
    kept: holding every layer's float32 values at once would cost the whole model's size again."""

    digest: str
    size: int
    quantized: QuantizedWeight
    scaled_after: bool


def quantized_layers(student: Denoiser) -> dict[str, FoldedWeight]:
    """key -> the folded weight of every quantized linear of ``student``."""
    layers = {}
    for index, block in enumerate(student.blocks):
        for group in student.linear_groups():
            for name in group:
                layer = block.get_submodule(name)
                if not isinstance(layer, QuantLinear):
                    raise ConfigError(f"blocks.{index}.{name} is not quantized")
                scaled_after = layer.weight is None
                values = (layer.weight_codes if scaled_after else layer.weight.T).detach().float().contiguous()
                layers[f"blocks.{index}.{name}"] = FoldedWeight(
                    _digest(values.numpy()), values.numel(), layer.quantized, scaled_after
                )
    return layers


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _integer_array(codes: torch.Tensor, bits: int, signed: bool) -> np.ndarray:
    values = codes.cpu().numpy()
    if bits == 4:
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return values.astype(np.int8 if signed else np.uint8)


def detach_weight_initializers(graph, layers: dict[str, FoldedWeight]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Find each layer's folded W^T among the initializers of the exporter's graph (an ``onnx_ir`` graph, before
    any proto exists) and put a one-element placeholder in its place, so the float weights are never copied
    into the proto. Returns initializer name -> (layer key, shape); every layer must be found exactly once.

    A W^T can also be integer-typed: a student keeping its centred codes as int8 / int16 exports them as such,
    cast to float where they are multiplied."""
    import onnx_ir as ir

    wanted = {layer.digest: key for key, layer in layers.items()}
    if len(wanted) != len(layers):
        raise ConfigError("two quantized layers have identical weights: cannot tell their initializers apart")
    kinds = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.INT16)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in kinds:
            continue
        array = tensor.numpy()
        key = wanted.get(_digest(array.astype(np.float32, copy=False)))
        if key is None or array.size != layers[key].size:
            continue
        if any(key == seen for seen, _ in found.values()):
            raise ConfigError(f"layer {key} appears twice in the exported graph")
        found[name] = (key, tuple(array.shape))
        value.const_value = ir.Tensor(np.zeros(1, array.dtype), name=name)
    missing = sorted(set(layers) - {key for key, _ in found.values()})
    if missing:
        raise ConfigError(f"the exported graph has no weight initializer for {', '.join(missing[:3])}")
    return found


def quantize_weight_initializers(
    model: onnx.ModelProto, layers: dict[str, FoldedWeight], found: dict[str, tuple[str, tuple[int, ...]]],
    scale_dtype: np.dtype,
) -> int:  # fmt: skip
    """Replace each placeholder ``detach_weight_initializers`` left by the layer's codes + DequantizeLinear.

    A W^T that holds the centred codes themselves (``scaled_after``) dequantizes with unit scales.
    Returns how many initializers were replaced."""
    graph = model.graph
    replaced = [init for init in graph.initializer if init.name in found]
    for init in replaced:
        key, shape = found[init.name]
        graph.initializer.remove(init)
        initializers, nodes = _dequantize(key, layers[key], init.name, shape, scale_dtype)
        graph.initializer.extend(initializers)
        for node in reversed(nodes):
            graph.node.insert(0, node)
    if len(replaced) != len(found):
        raise ConfigError("the exported proto lost a weight initializer")
    _drop_stale_casts(graph, set(found), helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype)))
    return len(replaced)


def _dequantize(
    key: str, folded: FoldedWeight, name: str, shape: tuple[int, ...], scale_dtype: np.dtype
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The initializers and nodes that make the tensor ``name`` (of ``shape``) from one layer's codes: blocked
    along K for group-wise weights, per output channel otherwise."""
    q = folded.quantized
    prefix = key.replace(".", "_")
    codes = _integer_array(q.codes.T.contiguous(), q.spec.bits, q.spec.symmetric)  # [K, N]
    inputs = [f"{prefix}_codes", f"{prefix}_scale"]
    group = q.codes.shape[1] // q.scale.shape[1]
    blocked = q.spec.group_size is not None  # even a single group: TensorRT takes blocked DQ only
    scale = q.scale.T.contiguous().numpy() if blocked else q.scale[:, 0].numpy()  # [G, N] or [N]
    if folded.scaled_after:
        scale = np.ones_like(scale)
    new = [numpy_helper.from_array(codes, inputs[0]), numpy_helper.from_array(scale.astype(scale_dtype), inputs[1])]
    if q.zero is not None:
        zero = q.zero.T.contiguous() if blocked else q.zero[:, 0]
        inputs.append(f"{prefix}_zero")
        new.append(numpy_helper.from_array(_integer_array(zero.round(), q.spec.bits, False), inputs[2]))
    attrs = {"axis": 0, "block_size": group} if blocked else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", inputs, [name], name=f"{prefix}_dequantize", **attrs)]
    if shape != codes.shape:  # the exporter folded a reshape of W^T (per-group products)
        nodes[0].output[0] = f"{prefix}_dequantized"
        new.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{prefix}_shape"))
        nodes.append(helper.make_node("Reshape", [nodes[0].output[0], new[-1].name], [name], name=f"{prefix}_reshape"))
    return new, nodes


def _drop_stale_casts(graph: onnx.GraphProto, replaced: set[str], dequantized: int) -> None:
    """An integer initializer's recorded type would contradict the float its DequantizeLinear now makes, and
    the Cast to float the student multiplied it through now reads that float: drop both."""
    stale = [info for info in graph.value_info if info.name in replaced]
    for info in stale:
        graph.value_info.remove(info)
    readers = consumers(graph)
    for name in replaced:
        for cast in readers.get(name, []):
            to = next((a for a in cast.attribute if a.name == "to"), None)
            if cast.op_type != "Cast" or to is None or helper.get_attribute_value(to) != dequantized:
                continue
            for user in readers.get(cast.output[0], []):
                user.input[:] = [name if i == cast.output[0] else i for i in user.input]
            graph.node.remove(cast)


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
