"""Weight and activation grids and QuantLinear: the integer product and its devices."""

import pytest
import torch

from faircalib.calib.config import preset
from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, QuantLinear, install
from faircalib.calib.quant import (
    ActSpec,
    WeightSpec,
    code_matmul,
    dequantize_weight,
    fake_quant_activation,
    fake_quant_weight,
    quantize_weight,
    weight_qparams,
)
from faircalib.calib.rtn import rtn_weight
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from tests.calib.helpers import SPECS, layer


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
    layer_ = QuantLinear(QuantizedLayer(q, act), bias, torch.float32)
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


def test_a_quantized_linear_takes_its_codes_along_between_devices(tiny_dirs):
    block = load_denoiser(tiny_dirs["llada"]).blocks[0]
    cfg = preset("rtn", abits=4)
    weight = rtn_weight(block.q_proj.weight, cfg.weight_spec())
    layer = install(block, "q_proj", QuantizedLayer(weight, cfg.act_spec()), torch.float32)
    layer.to("meta")
    assert layer.weight_codes.is_meta and layer.quantized.codes.is_meta and layer.quantized.scale.is_meta
