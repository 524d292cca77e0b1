"""A linear layer that runs on quantized weights with per-token quantized inputs: the PyTorch reference
for what the exported graph computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from faircalib.calib.quant import (
    ActSpec,
    WeightSpec,
    code_matmul,
    dequantize_weight,
    fake_quant_activation,
    quantize_activation,
)


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes [N, K] (int8 signed / uint8 unsigned), scale [N, G], zero [N, G] or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: WeightSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), zero, self.spec)

    def centred_codes(self) -> torch.Tensor:
        """codes - zero as float32 [N, K]: integers, so that W = centred codes * scale per group."""
        codes = self.codes.float()
        if self.zero is None:
            return codes
        groups = self.zero.shape[1]
        return (codes.reshape(codes.shape[0], groups, -1) - self.zero.unsqueeze(-1)).reshape(codes.shape)


@dataclass(frozen=True)
class QuantizedLayer:
    """Everything calibration decides for one linear: its weight codes / scales / zero points, and how its input
    is quantized (the format's activation bits with the layer's calibrated clip ratio and static peak)."""

    weight: QuantizedWeight
    act: ActSpec

    def to(self, device: torch.device | str) -> QuantizedLayer:
        return QuantizedLayer(self.weight.to(device), self.act)


def integer_dtype(values: torch.Tensor) -> torch.dtype:
    """The narrower of int8 / int16 that holds these integers (centred 8-bit asymmetric codes span +-255)."""
    low, high = (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)
    return torch.int8 if low >= -128 and high <= 127 else torch.int16


class QuantLinear(nn.Module):
    """y = x W^T + b on quantized weights.

    With quantized activations the product is taken on integer codes and scaled afterwards
    (``code_matmul``), as a W4A4 / W8A8 integer GEMM takes it. For 4-bit operands every partial sum is an
    integer far below 2^24, so float32 gets it exactly in any summation order: ONNX Runtime then computes
    these layers bit for bit as PyTorch does, and a rounding decision of a later activation quantizer
    cannot tip one way here and the other way there.

    Weight-only layers multiply by the dequantized weight, as TensorRT's int4 weight-only GEMM does, and
    static per-tensor activations go through quantize / dequantize ops that export as the
    QuantizeLinear -> DequantizeLinear pair TensorRT fuses into an INT8 GEMM.

    ``placeholder``: the weight buffers hold one value broadcast to their shape, costing nothing: a student
    only to be traced for export, which writes the weights from ``quantized`` (its own outputs mean nothing).
    """

    def __init__(self, layer: QuantizedLayer, bias: torch.Tensor | None, dtype: torch.dtype, placeholder: bool = False):
        super().__init__()
        weight, act = layer.weight, layer.act
        self.out_features, self.in_features = weight.codes.shape
        self.quantized = weight
        self.act = act
        self.dtype = dtype
        if act.enabled and act.static_amax is None and act.group_size is None:
            # kept as integers, cast per product: in float32 they would take twice a bf16 layer's memory
            centred = weight.centred_codes().T
            self.register_buffer("weight_codes", centred.to(integer_dtype(centred)).contiguous())  # [K, N]
            self.register_buffer("weight_scale", weight.scale.float().T.contiguous())  # [G, N]
            self.weight = None
        else:
            self.register_buffer("weight", weight.dequantize().to(dtype))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.placeholder = placeholder
        self._drop_weights()

    @property
    def layer(self) -> QuantizedLayer:
        return QuantizedLayer(self.quantized, self.act)

    @property
    def device(self) -> torch.device:
        return (self.weight if self.weight is not None else self.weight_codes).device

    def _apply(self, fn, recurse=True):
        # ``quantized`` is not a buffer (the artifact reads it as it was solved, in no dtype a module cast could
        # change), but it must follow the layer between devices: a block sent back to the CPU while the next
        # one is calibrated would otherwise leave its codes on the GPU.
        super()._apply(fn, recurse)
        self.quantized = self.quantized.to(self.device)
        self._drop_weights()  # a cast or a move materialised the placeholders, one layer at a time
        return self

    def _drop_weights(self) -> None:
        if self.placeholder:
            for name in ("weight", "weight_codes"):
                value = getattr(self, name, None)
                if value is not None:
                    setattr(self, name, placeholder(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.act.static_amax is not None:
            return F.linear(static_quant_dequant(x, self.act), self.weight, self.bias)
        if self.act.group_size is not None:  # per-block scales: llama.cpp's integer products, taken in float
            return F.linear(fake_quant_activation(x, self.act), self.weight, self.bias)
        codes, scale = quantize_activation(x, self.act)
        y = code_matmul(codes, self.weight_codes.float(), self.weight_scale.float()) * scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        spec = self.quantized.spec
        return f"{self.in_features}, {self.out_features}, w{spec.bits} g{spec.group_size} a{self.act.bits}"


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """One value broadcast to ``like``'s shape, dtype and device: stands, at no cost, for values never read."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride())


def static_quant_dequant(x: torch.Tensor, act: ActSpec) -> torch.Tensor:
    """x on the per-tensor grid of a static spec, as ONNX QuantizeLinear -> DequantizeLinear computes it."""
    scale, qmax = act.static_scale, 2 ** (act.bits - 1) - 1
    ops = torch.ops.quantized_decomposed
    codes = ops.quantize_per_tensor(x, scale, 0, -qmax - 1, qmax, torch.int8)
    return ops.dequantize_per_tensor(codes, scale, 0, -qmax - 1, qmax, torch.int8, out_dtype=x.dtype)


def install(
    block: nn.Module, name: str, layer: QuantizedLayer, dtype: torch.dtype, placeholder: bool = False
) -> QuantLinear:
    """Replace the linear ``name`` of ``block`` by a QuantLinear of ``layer`` (on the linear's device)."""
    linear = block.get_submodule(name)
    quantized = QuantLinear(layer, linear.bias, dtype, placeholder).to(linear.weight.device)
    replace_linear(block, name, quantized)
    return quantized


def replace_linear(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``name`` of ``root``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
