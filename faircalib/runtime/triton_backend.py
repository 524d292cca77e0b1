"""The student on the Triton kernels: a calibration artifact applied to the checkpoint, every quantized linear
the kernels serve swapped for a ``KernelLinear`` that keeps its weight packed on the device.

It runs the same schedule as every backend. Where Triton cannot run (a CPU without ``TRITON_INTERPRET=1``)
the kernels' torch references stand in, so the backend runs, slowly, anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.linear import QuantizedLayer, QuantLinear, integer_dtype, replace_linear
from faircalib.kernels import ops
from faircalib.kernels.hadamard import OnlineHadamard
from faircalib.kernels.int4 import pack_int4
from faircalib.models.base import Denoiser
from faircalib.runtime.backends import TorchBackend


class KernelLinear(nn.Module):
    """y = x W^T + b of a calibrated layer on the kernels: an integer GEMM of per-token activation codes and
    weight codes (W4A4, W4A8, W8A8; the online Hadamard before it fused into its quantizer when
    ``hadamard_block``), or a dequantize-GEMM for weight-only layers (W4A16).

    Symmetric 4-bit weights stay packed two a byte; other weights keep int8 codes (centred on their zero
    points for the integer GEMM)."""

    def __init__(self, layer: QuantizedLayer, bias: torch.Tensor | None):
        super().__init__()
        if not self.serves(layer):
            raise ValueError(f"the kernels do not serve {layer.weight.spec} with {layer.act}")
        weight, self.act = layer.weight, layer.act
        self.out_features, self.in_features = weight.codes.shape
        self.integer = self.act.enabled
        self.packed = weight.spec.bits == 4 and (weight.spec.symmetric or not self.integer)
        self.hadamard_block = 0
        if self.integer:
            codes, zero = weight.centred_codes().to(torch.int8), None
        else:
            codes, zero = weight.codes, None if weight.zero is None else weight.zero.float()
        self.register_buffer("codes", pack_int4(codes) if self.packed else codes.contiguous())
        self.register_buffer("scale", weight.scale.float().contiguous())
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    @staticmethod
    def serves(layer: QuantizedLayer) -> bool:
        """Weight-only layers, and per-token (or static per-tensor) activations whose centred codes and
        weight codes both fit int8; llama.cpp's per-block activations stay on the reference layer."""
        act, weight = layer.act, layer.weight
        if not act.enabled:
            return True
        fits = act.symmetric or act.bits <= 7
        return act.group_size is None and fits and integer_dtype(weight.centred_codes()) == torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.integer:
            static = self.act.static_scale if self.act.static_amax is not None else None
            codes, scale = ops.quantize_rows(rows, self.act.bits, self.act.symmetric, self.act.clip_ratio, static,
                                             self.hadamard_block)  # fmt: skip
            y = ops.int_gemm(codes, scale, self.codes, self.scale, self.bias, x.dtype, self.packed)
        else:
            y = ops.dequant_gemm(rows, self.codes, self.scale, self.zero, self.bias, self.packed)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = f"int8 GEMM a{self.act.bits}" if self.integer else "dequant GEMM"
        hadamard = f", hadamard {self.hadamard_block}" if self.hadamard_block else ""
        return f"{self.in_features}, {self.out_features}, {kind}, packed={self.packed}{hadamard}"


def swap_kernel_linears(model: Denoiser) -> int:
    """Replace, in place, every ``QuantLinear`` of ``model``'s blocks that the kernels serve by a
    ``KernelLinear``, and fold an online Hadamard into the integer down projection that reads it; returns
    how many layers were swapped."""
    layout, swapped = model.rotation_layout(), 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, QuantLinear) and KernelLinear.serves(module.layer):
                replace_linear(block, name, KernelLinear(module.layer, module.bias))
                swapped += 1
        if layout is None:
            continue
        online, down = block.get_submodule(layout.ffn_down_input), block.get_submodule(layout.ffn_down)
        if isinstance(online, OnlineHadamard) and isinstance(down, KernelLinear) and down.integer:
            down.hadamard_block = online.block
            replace_linear(block, layout.ffn_down_input, nn.Identity())
    return swapped


class TritonBackend(TorchBackend):
    """``backend(input_ids [B, L]) -> logits [B, L, V] float32`` of an artifact's student on the kernels.

    ``model`` becomes the student. Loaded on the host and given a ``device``, it moves there once its weights
    are packed, so the device never holds the full-precision weights of a quantized linear."""

    name = "triton"

    def __init__(self, model: Denoiser, artifact: QuantArtifact, device: torch.device | str | None = None):
        student = artifact.apply(model)
        self.swapped = swap_kernel_linears(student)
        super().__init__(student.to(device) if device is not None else student)
