"""A linear layer that runs on quantized weights (held dequantized) with per-token fake-quant inputs:
the PyTorch reference for what the exported graph computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.calib.quant import ActSpec, WeightSpec, dequantize_weight, fake_quant_activation


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes [N, K] (int8 signed / uint8 unsigned), scale [N, G], zero [N, G] or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: WeightSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero)


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActSpec, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.quantized = weight
        self.act = act
        self.register_buffer("weight", weight.dequantize().to(dtype))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x, self.act), self.weight, self.bias)

    def extra_repr(self) -> str:
        spec = self.quantized.spec
        return f"{self.in_features}, {self.out_features}, w{spec.bits} g{spec.group_size} a{self.act.bits}"


def replace_linear(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``name`` of ``root``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
