"""Orthogonal Hadamard transforms for QuaRot-style rotation.

Sizes that are not a power of two (LLaDA's 12288, Dream's 3584 and 18944) use a block-diagonal
Hadamard whose block is the largest power of two dividing the size (capped): still orthogonal, and it
spreads outliers within each block, which is what quantization groups see.
"""

from __future__ import annotations

import torch
from torch import nn

from faircalib.errors import ConfigError


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester Hadamard matrix [n, n] of +-1 entries; n a power of two."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_block(n: int, max_block: int = 4096) -> int:
    """The largest power of two dividing n, at most max_block."""
    if n < 1:
        raise ConfigError(f"size must be positive, got {n}")
    block = n & -n
    while block > max_block:
        block //= 2
    return block


def random_hadamard(n: int, seed: int, max_block: int = 4096) -> torch.Tensor:
    """Orthogonal [n, n] float64: diag(random signs) @ blockdiag(H_b / sqrt(b))."""
    block = hadamard_block(n, max_block)
    h = hadamard_matrix(block) / block**0.5
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs.unsqueeze(1) * torch.block_diag(*([h] * (n // block)))


def apply_block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] @ blockdiag(H_b / sqrt(b)) as a fast Walsh-Hadamard transform: log2(b) butterfly stages
    of elementwise sums and differences, O(n log b).

    Elementwise ops round the same way everywhere, so an exported graph (ONNX Runtime, TensorRT) rotates
    bit for bit as PyTorch does, where a matrix product would add in its own order and could tip a later
    activation quantizer's rounding. ``hadamard_reference`` is the matrix product it is tested against.
    """
    n = x.shape[-1]
    if n % block or block & (block - 1):
        raise ConfigError(f"last dimension {n} is not a multiple of the power-of-two Hadamard block {block}")
    lead = x.shape[:-1]
    half = 1
    while half < block:
        pairs = x.reshape(*lead, n // (2 * half), 2, half)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([low + high, low - high], dim=-2).reshape(*lead, n)
        half *= 2
    return x * (1.0 / block**0.5)


def hadamard_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """The slow reference of ``apply_block_hadamard``: a product with the materialised block matrix."""
    n = x.shape[-1]
    h = (hadamard_matrix(block, torch.float64) / block**0.5).to(x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape)


class OnlineHadamard(nn.Module):
    """The online rotation QuaRot puts before the FFN down projection (the down weight absorbs H)."""

    def __init__(self, size: int, max_block: int = 4096):
        super().__init__()
        self.size = size
        self.block = hadamard_block(size, max_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_block_hadamard(x, self.block)

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block}"
