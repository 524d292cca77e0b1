"""The rotation (and block transforms) learned on the 4-bit KL: orthogonal, better, and the model left alone."""

import pytest
import torch

from faircalib.calib.block_transforms import BLOCK_TRANSFORM_KEYS, FFN_SCALE_KEY, fold_block_transforms
from faircalib.calib.learned_rotation import ROTATION_KEY, learn_rotation, skew_rotation
from faircalib.calib.objectives import decision_masks, weighted_kl
from faircalib.calib.quant import ActSpec, fake_quant_activation
from faircalib.calib.quarot import fold_rotation, rotate_model
from faircalib.models.tiny import tiny_denoiser


def test_skew_rotation_is_orthogonal():
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = skew_rotation(a)
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(skew_rotation(torch.zeros(4, 4)), torch.eye(4))


def _four_bit_kl(model, tokens, weights, masks, act):
    """The learned rotation's objective on every state: full-precision vs 4-bit-activation logits."""
    names = [name for group in model.linear_groups() for name in group]
    fp = model(tokens)
    handles = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, a: (fake_quant_activation(a[0], act),))
        for block in model.blocks
        for n in names
    ]
    quantized = model(tokens)
    for handle in handles:
        handle.remove()
    return float(weighted_kl(quantized[masks], fp[masks], weights[masks]))


@pytest.mark.parametrize("block_transforms", [False, True], ids=["rotation", "rotation+blocks"])
@pytest.mark.parametrize("family", ["llada", "dream"])  # Dream's q/k/v carry biases
@torch.no_grad()
def test_learned_rotation_lowers_the_four_bit_kl_and_leaves_the_model_alone(family, block_transforms):
    model = tiny_denoiser(family, seed=4)
    layout = rotate_model(model, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 90, (24, 10), generator=gen)
    tokens[:, 5:] = torch.where(torch.rand(24, 5, generator=gen) < 0.6, model.spec.mask_token_id, tokens[:, 5:])
    weights = 1 + torch.rand(24, 10, generator=gen)
    masks = decision_masks([tokens], model.spec)[0]
    act = ActSpec(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _four_bit_kl(model, tokens, weights, masks, act)
    with torch.enable_grad():
        learned = learn_rotation(
            model, [tokens], [weights], [masks], act, steps=30, lr=4e-2, batch=8, seed=0,
            block_transforms=block_transforms,
        )  # fmt: skip
    assert set(learned) == {ROTATION_KEY, *(BLOCK_TRANSFORM_KEYS if block_transforms else ())}
    r = learned[ROTATION_KEY]
    assert r.dtype == torch.float64
    torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64))
    assert model.state_dict().keys() == state.keys()  # the parametrizations are gone ...
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # ... and left the weights as they were
    assert not any(m._forward_pre_hooks for m in model.modules())  # so are the quantization hooks
    fold_rotation(model, layout, r)
    if block_transforms:
        assert not torch.equal(learned[FFN_SCALE_KEY], torch.ones_like(learned[FFN_SCALE_KEY]))  # they did move
        fold_block_transforms(model, layout, learned)
    after = _four_bit_kl(model, tokens, weights, masks, act)
    assert after < 0.9 * before, (before, after)  # thirty steps on random weights take a tenth off at least


def test_rotation_and_block_transforms_learn_on_a_bf16_model():
    model = tiny_denoiser("dream", seed=4).to(torch.bfloat16)
    rotate_model(model, seed=0)
    tokens = torch.randint(3, 90, (8, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 6:] = model.spec.mask_token_id
    masks = decision_masks([tokens], model.spec)
    learned = learn_rotation(
        model, [tokens], [torch.ones(8, 10)], masks, ActSpec(4), steps=3, lr=1e-2, batch=4, seed=0,
        block_transforms=True,
    )  # fmt: skip
    assert all(value.dtype == torch.float64 and torch.isfinite(value).all() for value in learned.values())
