import pytest
import torch

from faircalib.calib.pipeline import decision_masks
from faircalib.calib.quant import ActSpec, fake_quant_activation
from faircalib.calib.recon import weighted_kl
from faircalib.calib.rotation import (
    BLOCK_TRANSFORM_KEYS,
    FFN_SCALE_KEY,
    NORM_SCALE_KEY,
    ROTATION_KEY,
    VALUE_KEY,
    fold_block_transforms,
    fold_rotation,
    learn_rotation,
    out_columns,
    rotate_model,
    skew_rotation,
    value_rows,
)
from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import (
    OnlineHadamard,
    apply_block_hadamard,
    hadamard_block,
    hadamard_matrix,
    hadamard_reference,
    random_hadamard,
)
from faircalib.models import load_denoiser
from faircalib.models.tiny import tiny_denoiser

IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


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


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rotation_preserves_the_function(family):
    model = tiny_denoiser(family, seed=4)
    before = model(IDS)
    rotate_model(model, seed=1)
    torch.testing.assert_close(model(IDS), before, rtol=1e-4, atol=1e-4)
    assert type(model.blocks[0].get_submodule(model.rotation_layout().ffn_down_input)) is OnlineHadamard


def test_skew_rotation_is_orthogonal():
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = skew_rotation(a)
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(skew_rotation(torch.zeros(4, 4)), torch.eye(4))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_second_rotation_folds_without_changing_the_function(family):
    model = tiny_denoiser(family, seed=4)
    before = model(IDS)
    layout = rotate_model(model, seed=1)
    dim = model.embed(IDS).shape[-1]
    fold_rotation(model, layout, skew_rotation(torch.randn(dim, dim, dtype=torch.float64)))
    torch.testing.assert_close(model(IDS), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="does not fit"):
        fold_rotation(model, layout, torch.eye(dim + 1, dtype=torch.float64))


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


def test_rotation_spreads_an_outlier_channel():
    model = tiny_denoiser("llada", seed=4)
    with torch.no_grad():
        model.model.transformer.wte.weight[:, 7] *= 30  # one loud residual channel
    seen = {}
    model.blocks[0].q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))

    def peak_to_rms():
        model(IDS)
        x = seen["x"]
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    plain = peak_to_rms()
    rotate_model(model, seed=0)
    assert peak_to_rms() < plain / 2


def test_post_ln_models_cannot_be_rotated(tiny_dirs):
    with pytest.raises(ConfigError, match="post-LN"):
        rotate_model(load_denoiser(tiny_dirs["bert"]), seed=0)


def test_smoothquant_preserves_the_function_and_flattens_activation_peaks():
    from faircalib.calib.smooth import norm_output_absmax, smooth_block

    model = tiny_denoiser("llada", seed=4)
    with torch.no_grad():
        model.blocks[0].attn_norm.weight[3] = 25.0  # a loud channel after the norm
    hidden = [model.embed(IDS)]
    contexts = [model.block_context(IDS)]
    before_out = model(IDS)
    peaks = norm_output_absmax(model, model.blocks[0], ["attn_norm"], hidden, contexts)["attn_norm"]
    changed = smooth_block(model, model.blocks[0], hidden, contexts, alpha=0.5)
    torch.testing.assert_close(model(IDS), before_out, rtol=1e-4, atol=1e-4)
    after = norm_output_absmax(model, model.blocks[0], ["attn_norm"], hidden, contexts)["attn_norm"]
    assert float(after.max() / after.median()) < float(peaks.max() / peaks.median()) / 2
    assert set(changed) == {"attn_norm.weight", "ff_norm.weight"}


def test_smoothquant_refuses_post_ln(tiny_dirs):
    from faircalib.calib.smooth import smooth_block

    model = load_denoiser(tiny_dirs["bert"])
    with pytest.raises(ConfigError, match="SmoothQuant needs pre-norm"):
        smooth_block(model, model.blocks[0], [model.embed(IDS[:, :5])], [model.block_context(IDS)], alpha=0.5)
