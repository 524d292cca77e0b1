"""Small lookups over an ONNX graph shared by the export passes and the TensorRT rules check."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def activation_qdq_pairs(
    graph: onnx.GraphProto, readers: dict[str, list[onnx.NodeProto]]
) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every QuantizeLinear whose only reader is a DequantizeLinear, with that DequantizeLinear."""
    for quantize in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        users = readers.get(quantize.output[0], [])
        if len(users) == 1 and users[0].op_type == "DequantizeLinear":
            yield quantize, users[0]
