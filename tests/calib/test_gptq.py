"""GPTQ against a slow column-by-column reference and against RTN, and its damping retries."""

import pytest
import torch

from faircalib.calib.gptq import CholeskyError, gptq_quantize, inverse_hessian_factor
from faircalib.calib.hessian import weighted_gram
from faircalib.calib.quant import WeightSpec, dequantize_weight, fake_quant_weight, quantize_weight, weight_qparams
from tests.calib.helpers import SPECS, layer


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
