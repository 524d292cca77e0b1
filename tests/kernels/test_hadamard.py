"""The Hadamard kernels: orthogonality, block sizes of real dimensions, the fast transform against the matrix."""

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import (
    OnlineHadamard,
    apply_block_hadamard,
    hadamard_block,
    hadamard_matrix,
    hadamard_reference,
    random_hadamard,
)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_sylvester_hadamard_is_orthogonal(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n,block", [(96, 32), (704, 64), (12288, 4096), (3584, 512), (18944, 512)])
def test_block_sizes_of_real_dimensions(n, block):
    assert hadamard_block(n) == block


def test_random_hadamard_is_orthogonal_for_non_powers_of_two():
    q = random_hadamard(96, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64))
    assert not torch.equal(q, random_hadamard(96, seed=4))


def test_online_hadamard_matches_the_dense_matrix():
    x = torch.randn(3, 5, 96)
    dense = torch.block_diag(*([hadamard_matrix(32, torch.float32) / 32**0.5] * 3))
    torch.testing.assert_close(apply_block_hadamard(x, 32), x @ dense)
    assert OnlineHadamard(96).block == 32


@pytest.mark.parametrize("n,block", [(704, 64), (96, 32), (4096, 4096), (8, 1)])
def test_fast_hadamard_matches_the_matrix_product(n, block):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(apply_block_hadamard(x, block), hadamard_reference(x, block), rtol=1e-12, atol=1e-12)


def test_fast_hadamard_refuses_a_block_that_does_not_divide():
    with pytest.raises(ConfigError, match="Hadamard block"):
        apply_block_hadamard(torch.zeros(2, 100), 64)
