import pytest
import torch

from faircalib.calib.gptq import CholeskyError, gptq_quantize, inverse_hessian_factor
from faircalib.calib.hessian import accumulate_hessian, weighted_gram
from faircalib.calib.linear import QuantizedWeight, QuantLinear
from faircalib.calib.quant import (
    ActSpec,
    WeightSpec,
    code_matmul,
    dequantize_weight,
    fake_quant_activation,
    fake_quant_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_qparams,
)
from faircalib.errors import ConfigError

SPECS = [
    WeightSpec(4, None, True),
    WeightSpec(4, 16, True),
    WeightSpec(4, 16, False),
    WeightSpec(8, None, False),
    WeightSpec(3, 32, True),
]


def layer(n=24, k=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # correlated inputs with uneven scales, as real activations have
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) * torch.linspace(0.2, 3.0, k)) @ mix
    return w, x


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_is_exact_on_the_grid(spec):
    w, _ = layer()
    scale, zero = weight_qparams(w, spec)
    codes = quantize_weight(w, scale, zero, spec)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    on_grid = dequantize_weight(codes, scale, zero)
    assert torch.equal(quantize_weight(on_grid, scale, zero, spec), codes)
    assert torch.equal(dequantize_weight(quantize_weight(on_grid, scale, zero, spec), scale, zero), on_grid)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_error_is_at_most_half_a_step(spec):
    w, _ = layer()
    scale, _ = weight_qparams(w, spec)
    step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    assert bool(((fake_quant_weight(w, spec) - w).abs() <= step / 2 + 1e-6).all())


def test_symmetric_int4_has_no_zero_point_and_uses_the_signed_range():
    w, _ = layer()
    spec = WeightSpec(4, 16, True)
    scale, zero = weight_qparams(w, spec)
    assert zero is None and scale.shape == (24, 4)
    codes = quantize_weight(w, scale, zero, spec)
    assert int(codes.max()) == 7 and int(codes.min()) >= -8


def test_asymmetric_zero_point_formula():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    scale, zero = weight_qparams(w, WeightSpec(4, None, False))
    assert torch.allclose(scale, torch.tensor([[3.0 / 15]]))
    assert torch.equal(zero, torch.round(torch.tensor([[1.0 / 0.2]])))


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="not a multiple of group_size"):
        weight_qparams(torch.randn(4, 20), WeightSpec(4, 16, True))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (8, False)])
def test_activation_fake_quant_is_per_token(bits, symmetric):
    spec = ActSpec(bits, symmetric)
    x = torch.randn(3, 5, 32)
    x[0, 0] *= 100  # one loud token must not coarsen the others
    y = fake_quant_activation(x, spec)
    levels = 2**bits
    for token in (x[1, 1], x[0, 0]):
        step = (token.abs().max() / (levels // 2 - 1)) if symmetric else (token.max() - token.min()) / (levels - 1)
        idx = (x == token).all(-1).nonzero()[0].tolist()
        assert (y[idx[0], idx[1]] - token).abs().max() <= step / 2 + 1e-5
    torch.testing.assert_close(fake_quant_activation(y, spec), y, rtol=1e-5, atol=1e-5)  # idempotent on its grid
    assert fake_quant_activation(x, ActSpec(16)) is x


@pytest.mark.parametrize("spec", SPECS[:4], ids=str)
@pytest.mark.parametrize("act", [ActSpec(4, True), ActSpec(4, False, 0.9), ActSpec(8, True)], ids=str)
def test_quant_linear_takes_the_integer_product_of_the_slow_reference(spec, act):
    w, x = layer(tokens=40)
    scale, zero = weight_qparams(w, spec)
    q = QuantizedWeight(quantize_weight(w, scale, zero, spec), scale, zero, spec)
    bias = torch.randn(w.shape[0])
    layer_ = QuantLinear(q, bias, act, torch.float32)
    x = x.reshape(2, 20, -1)
    reference = torch.nn.functional.linear(fake_quant_activation(x, act), q.dequantize(), bias)
    torch.testing.assert_close(layer_(x), reference, rtol=1e-5, atol=1e-4)
    assert torch.equal(q.centred_codes(), q.centred_codes().round())
    # the codes are kept as the narrowest integers that hold them, exactly
    assert layer_.weight_codes.dtype == (torch.int8 if spec.bits == 4 or spec.symmetric else torch.int16)
    assert torch.equal(layer_.weight_codes.float(), q.centred_codes().T)


def test_code_products_do_not_depend_on_summation_order():
    """The property the exported W4A4 graph relies on to match PyTorch bit for bit."""
    g = torch.Generator().manual_seed(0)
    x_codes = torch.randint(-8, 8, (64, 1024), generator=g).float()
    w_codes = torch.randint(-8, 8, (1024, 32), generator=g).float()
    w_scale = torch.rand(1, 32, generator=g)
    forward = code_matmul(x_codes, w_codes, w_scale)
    backward = code_matmul(x_codes.flip(-1), w_codes.flip(0), w_scale)
    exact = (x_codes.double() @ w_codes.double()).float() * w_scale[0]
    assert torch.equal(forward, backward) and torch.equal(forward, exact)


def test_pack_int4_low_nibble_first_and_round_trip():
    signed = torch.tensor([[-8, 7, 0, -1, 3, -4]], dtype=torch.int8)
    packed = pack_int4(signed)
    assert packed.tolist() == [[0x78, 0xF0, 0xC3]]  # (-8 & 15) | (7 << 4) = 0x78 ...
    assert torch.equal(unpack_int4(packed, signed=True), signed)
    unsigned = torch.randint(0, 16, (5, 8), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(unsigned), signed=False), unsigned)
    with pytest.raises(ConfigError, match="even last dimension"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


# --- Hessian ------------------------------------------------------------------------------------


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


# --- GPTQ ---------------------------------------------------------------------------------------


def hessian_error(w, q, h):
    d = (w.double() - q.double()) @ torch.linalg.cholesky(h.double())
    return float((d * d).sum())


def slow_gptq(w, h, spec, damp=0.01):
    """Column by column with immediate full updates, per-channel or static groups in natural order."""
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero = weight_qparams(w, spec)
    group = w.shape[1] // scale.shape[1]
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        g = i // group
        z = zero[:, g : g + 1] if zero is not None else None
        q = dequantize_weight(quantize_weight(w[:, i : i + 1], scale[:, g : g + 1], z, spec), scale[:, g : g + 1], z)
        out[:, i] = q[:, 0]
        err = (w[:, i] - q[:, 0]) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
    return out


@pytest.mark.parametrize("spec", [WeightSpec(4, None, True), WeightSpec(4, 16, False)], ids=str)
def test_gptq_lazy_blocks_match_the_slow_reference(spec):
    w, x = layer()
    h, _ = weighted_gram(x)
    fast = gptq_quantize(w, h, spec, act_order=False, block_size=16).dequantize()
    if spec.group_size is None:
        torch.testing.assert_close(fast.double(), slow_gptq(w, h, spec), rtol=0, atol=1e-4)
    else:  # dynamic groups: the slow reference uses static ones, so compare quality instead
        assert hessian_error(w, fast, h) <= 1.05 * hessian_error(w, slow_gptq(w, h, spec), h)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_hessian_norm(spec, act_order):
    w, x = layer()
    h, _ = weighted_gram(x)
    gptq = gptq_quantize(w, h, spec, act_order=act_order).dequantize()
    rtn = fake_quant_weight(w, spec)
    assert hessian_error(w, gptq, h) < 0.8 * hessian_error(w, rtn, h)


def test_gptq_with_uniform_weights_equals_plain_gptq():
    w, x = layer()
    spec = WeightSpec(4, 16, True)
    plain, _ = weighted_gram(x)
    uniform, _ = weighted_gram(x, torch.full((x.shape[0],), 3.0))
    a = gptq_quantize(w, plain, spec)
    b = gptq_quantize(w, uniform, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_gptq_codes_and_scales_are_consistent_with_act_order():
    w, x = layer()
    spec = WeightSpec(4, 16, True)
    result = gptq_quantize(w, weighted_gram(x)[0], spec, act_order=True)
    assert result.scale.shape == (24, 4) and result.zero is None
    assert int(result.codes.min()) >= -8 and int(result.codes.max()) <= 7
    torch.testing.assert_close(result.dequantize(), dequantize_weight(result.codes, result.scale, None))


def test_dead_inputs_and_singular_hessian_retry_damping(caplog):
    w, x = layer(k=32)
    x[:, 5] = 0  # a dead input channel
    x = x[:8]  # rank-deficient: fewer tokens than features
    h, _ = weighted_gram(x)
    result = gptq_quantize(w, h, WeightSpec(4, None, True), damp=0.0)
    assert result.retries >= 1 and result.damp > 0
    assert "not positive definite" in caplog.text
    assert (result.dequantize()[:, 5] == 0).all()


def test_cholesky_failure_after_all_retries_is_a_clear_error():
    bad = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(CholeskyError, match="not positive definite even with damping"):
        inverse_hessian_factor(bad, damp=0.01, max_retries=2)
