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
    """Inverse of ``pack_int4``: uint8 [..., K // 2] -> int8 codes [..., K]. The result is allocated before any
    temporary and the nibbles are written into it in place, so a loader unpacking layer after layer leaves no
    freed temporaries pinned under the codes it keeps."""
    codes = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8, device=packed.device)
    nibbles = packed.view(torch.int8)
    torch.bitwise_and(nibbles, 0xF, out=codes[..., 0::2])
    torch.bitwise_right_shift(packed, 4, out=codes[..., 1::2])
    if signed:  # 8..15 stand for -8..-1
        codes.sub_(codes.gt(7).to(torch.int8) << 4)
    return codes
