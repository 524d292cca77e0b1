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
    """x [..., n] @ blockdiag(H_b / sqrt(b)) without materialising the n x n matrix."""
    n = x.shape[-1]
    if n % block:
        raise ConfigError(f"last dimension {n} is not a multiple of the Hadamard block {block}")
    h = (hadamard_matrix(block, torch.float32) / block**0.5).to(x.device, x.dtype)
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
