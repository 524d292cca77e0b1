"""Two int4 codes a byte, low nibble first: the layout of ONNX INT4 / UINT4 initializers, of our artifacts and
of the Triton kernels' packed weights."""

from __future__ import annotations

import torch

from faircalib.errors import ConfigError


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [..., K] (signed [-8, 7] or unsigned [0, 15], K even) -> uint8 [..., K // 2]."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 [..., K // 2] -> int8 codes [..., K]."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    codes = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(codes > 7, codes - 16, codes) if signed else codes
