"""Per-block transforms folded into a rotated model: the function is kept, bad transforms are refused."""

import pytest
import torch

from faircalib.calib.block_transforms import (
    FFN_SCALE_KEY,
    NORM_SCALE_KEY,
    VALUE_KEY,
    fold_block_transforms,
    out_columns,
    value_rows,
)
from faircalib.calib.quarot import rotate_model
from faircalib.errors import ConfigError
from faircalib.models.tiny import tiny_denoiser

IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def _random_block_transforms(model, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    n, dim = len(model.blocks), model.embed(IDS).shape[-1]
    dh = model.blocks[0].get_submodule(layout.value).weight.shape[0] // layout.value_heads
    ffn = model.blocks[0].get_submodule(layout.ffn_up).weight.shape[0]
    scales = lambda *shape: 0.5 + torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return {
        VALUE_KEY: torch.randn(n, layout.value_heads, dh, dh, generator=gen, dtype=torch.float64) + 3 * torch.eye(dh),
        NORM_SCALE_KEY: scales(n, len(layout.norm_readers), dim),
        FFN_SCALE_KEY: scales(n, ffn),
    }


@pytest.mark.parametrize("family", ["llada", "dream"])  # Dream: grouped-query attention, a value bias
def test_block_transforms_fold_without_changing_the_function(family):
    model = tiny_denoiser(family, seed=4)
    before = model(IDS)
    layout = rotate_model(model, seed=1)
    transforms = _random_block_transforms(model, layout, seed=2)
    fold_block_transforms(model, layout, transforms)
    torch.testing.assert_close(model(IDS), before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.blocks[0].get_submodule(layout.norm_readers[0][0]).weight, torch.ones(1))
    with pytest.raises(ConfigError, match="this model needs"):
        fold_block_transforms(model, layout, {**transforms, FFN_SCALE_KEY: transforms[FFN_SCALE_KEY][:, :-1]})
    with pytest.raises(ConfigError, match="NaN or infinite"):
        fold_block_transforms(model, layout, {**transforms, VALUE_KEY: transforms[VALUE_KEY] * float("nan")})
    with pytest.raises(ConfigError, match="must be positive"):
        fold_block_transforms(model, layout, {**transforms, NORM_SCALE_KEY: -transforms[NORM_SCALE_KEY]})
    with pytest.raises(ConfigError, match="lack 'value_transform'"):
        fold_block_transforms(model, layout, {k: v for k, v in transforms.items() if k != VALUE_KEY})


def test_value_and_out_transforms_against_per_head_matrices():
    """The batched fold against one explicit matrix product per head: 4 query heads share 2 value heads."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64) + 2 * torch.eye(3)
    v, o = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(5, 12, generator=gen, dtype=torch.float64)
    turned_v, turned_o = value_rows(v, t), out_columns(o, torch.linalg.inv(t).mT, query_heads=4)
    for k in range(2):
        torch.testing.assert_close(turned_v[3 * k : 3 * k + 3], t[k].T @ v[3 * k : 3 * k + 3])
    for h in range(4):
        inverse_t = torch.linalg.inv(t[h // 2]).T
        torch.testing.assert_close(turned_o[:, 3 * h : 3 * h + 3], o[:, 3 * h : 3 * h + 3] @ inverse_t)
