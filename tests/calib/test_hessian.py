"""The token-weighted Hessian: slow references, slicing, refusals, and its collection from a block's inputs."""

import pytest
import torch

import faircalib.calib.forward as forward
import faircalib.calib.hessian as hessian_module
from faircalib.calib.config import preset
from faircalib.calib.hessian import accumulate_hessian, collect_hessians, weighted_gram
from faircalib.models import load_denoiser


def test_weighted_hessian_matches_slow_reference():
    x = torch.randn(4, 7, 12)
    w = torch.rand(4, 7) * 3
    hessian, total = None, 0.0
    for chunk_x, chunk_w in zip(x.split(2), w.split(2), strict=True):
        hessian, total = accumulate_hessian(hessian, total, chunk_x, chunk_w)
    slow = torch.zeros(12, 12, dtype=torch.float64)
    for token, weight in zip(x.reshape(-1, 12).double(), w.reshape(-1).double(), strict=True):
        slow += weight * torch.outer(token, token)
    torch.testing.assert_close(hessian, slow)
    assert total == pytest.approx(float(w.sum()), rel=1e-6)


def test_weighted_hessian_in_slices_matches_one_product():
    """Slices of a few rows (cast to float64 one at a time) sum to what one float64 product gives."""
    x = torch.randn(3, 37, 16, dtype=torch.bfloat16)
    w = torch.rand(3, 37) * 4
    rows = x.reshape(-1, 16).double() * w.reshape(-1, 1).double().sqrt()
    for slice_bytes in (1, 8 * 16 * 5, 2**28):  # one row, five rows, everything at once
        gram, total = weighted_gram(x, w, slice_bytes=slice_bytes)
        torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
        assert total == pytest.approx(float(w.double().sum()))
    plain, n = weighted_gram(x, slice_bytes=8 * 16 * 5)
    torch.testing.assert_close(plain, x.reshape(-1, 16).double().T @ x.reshape(-1, 16).double())
    assert n == 3 * 37


def test_uniform_weights_give_the_plain_hessian():
    x = torch.randn(50, 12)
    plain, n = weighted_gram(x)
    weighted, total = weighted_gram(x, torch.full((50,), 2.5))
    torch.testing.assert_close(weighted / total, plain / n)


def test_negative_or_misshaped_weights_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        weighted_gram(torch.randn(3, 4), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="2 token weights for 3 tokens"):
        weighted_gram(torch.randn(3, 4), torch.ones(2))


def test_hessians_collected_in_slices_match_the_whole_chunk(tiny_dirs, monkeypatch):
    """Each slice of states must meet its own token weights."""
    model = load_denoiser(tiny_dirs["llada"])
    block, groups = model.blocks[0], model.linear_groups()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(9, 6, 64, generator=g)]
    weights = [torch.rand(9, 6, generator=g) * 5]
    contexts = [model.block_context(torch.zeros(9, 6, dtype=torch.long))]
    acts = {group[0]: preset("fair", abits=4).act_spec() for group in groups}
    whole = collect_hessians(model, block, groups, inputs, contexts, weights, acts)
    one_state = forward.states_per_slice(model, block, 6, slice_bytes=1)
    monkeypatch.setattr(
        hessian_module, "state_slices", lambda *args: forward.state_slices(*args, slice_bytes=2 * 4 * 6 * 192)
    )
    assert one_state == 1 and len(hessian_module.state_slices(model, block, inputs[0], contexts[0])) == 5
    sliced = collect_hessians(model, block, groups, inputs, contexts, weights, acts)
    for name, hessian in whole.items():
        torch.testing.assert_close(sliced[name], hessian, rtol=1e-10, atol=1e-12)
