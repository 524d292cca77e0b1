"""The Triton kernels against their torch references (on Triton's CPU interpreter here, on CUDA where there is
a GPU), over odd shapes; the references against the calibration's own arithmetic; int4 packing."""

import pytest
import torch

from faircalib.calib.linear import static_quant_dequant
from faircalib.calib.quant import ActSpec, quantize_activation
from faircalib.errors import ConfigError
from faircalib.kernels import ops, reference
from faircalib.kernels.int4 import pack_int4, unpack_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, weight groups, packed int4): M = 1, N odd, K not a multiple of the 64 or 128 tile, groups of 32 and
# of 10 (group boundaries inside a tile), several tiles in M and N
GEMMS = [(1, 17, 64, 1, False), (33, 17, 96, 3, True), (5, 40, 200, 1, False), (7, 9, 130, 13, True),
         (70, 130, 256, 2, True)]  # fmt: skip


def gemm_operands(m, n, k, groups, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g).to(torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    w = pack_int4(w) if packed else w
    scales = torch.rand(n, groups, generator=g) + 0.5, torch.rand(m, generator=g)
    return [t.to(DEVICE) for t in (a, w, *scales, torch.randn(n, generator=g))]


@pytest.fixture(autouse=True)
def _kernels_run():
    assert ops.triton_runs(torch.zeros(1, device=DEVICE)), "the tests must run the kernels, not the references"


@pytest.mark.parametrize("m,n,k,groups,packed", GEMMS)
def test_int_gemm_accumulates_integers_exactly(m, n, k, groups, packed):
    a, w, _, _, _ = gemm_operands(m, n, k, groups, packed)
    ones_n, ones_m = torch.ones(n, groups, device=DEVICE), torch.ones(m, device=DEVICE)
    exact = reference.int_accumulate(a, reference.weight_codes(w, packed), groups).sum(0)
    assert torch.equal(ops.int_gemm(a, ones_m, w, ones_n, packed=packed), exact.float())  # |sum| < 2^24


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,groups,packed", GEMMS)
def test_int_gemm_applies_scales_and_bias_as_the_reference(m, n, k, groups, packed, out_dtype):
    a, w, w_scale, a_scale, bias = gemm_operands(m, n, k, groups, packed, seed=1)
    y = ops.int_gemm(a, a_scale, w, w_scale, bias, out_dtype, packed)
    expected = reference.int_gemm(a, a_scale, w, w_scale, bias, out_dtype, packed)
    assert y.dtype == out_dtype
    if groups == 1 and out_dtype == torch.float32:  # the same float operations in the same order
        assert torch.equal(y, expected)
    else:  # groups are added in another order; bfloat16 then rounds the tiny difference either way
        torch.testing.assert_close(y, expected, rtol=1e-6 if out_dtype == torch.float32 else 8e-3, atol=1e-5)


QUANTIZERS = [dict(bits=4), dict(bits=8, clip_ratio=0.9), dict(bits=4, symmetric=False, clip_ratio=0.8),
              dict(bits=8, static_scale=0.02), dict(bits=4, hadamard_block=32), dict(bits=8, hadamard_block=64),
              dict(bits=4, symmetric=False, hadamard_block=16)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", QUANTIZERS)
@pytest.mark.parametrize("m,k", [(1, 64), (9, 192)])
def test_quantize_rows_equals_the_reference_bit_for_bit(m, k, kwargs, dtype):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * torch.linspace(0.1, 4, k)).to(DEVICE, dtype)
    x[0, 3] = 0.0 if m == 1 else x[0, 3]
    codes, scale = ops.quantize_rows(x, **kwargs)
    expected_codes, expected_scale = reference.quantize_rows(x, **kwargs)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale)


def test_quantize_rows_takes_a_row_that_is_not_a_power_of_two_and_a_row_of_zeros():
    x = torch.randn(3, 200, device=DEVICE)
    x[1] = 0
    codes, scale = ops.quantize_rows(x, 4)
    assert torch.equal(codes, reference.quantize_rows(x, 4)[0]) and not codes[1].any() and scale[1] > 0


@pytest.mark.parametrize("spec", [ActSpec(4), ActSpec(8, clip_ratio=0.85), ActSpec(4, symmetric=False, clip_ratio=0.9)])
def test_reference_quantizer_is_the_calibrations(spec):
    x = torch.randn(2, 5, 48) * 3
    codes, scale = reference.quantize_rows(x.reshape(-1, 48), spec.bits, spec.symmetric, spec.clip_ratio)
    calib_codes, calib_scale = quantize_activation(x, spec)
    assert torch.equal(codes.float(), calib_codes.reshape(-1, 48)) and torch.equal(scale, calib_scale.reshape(-1))


def test_reference_static_quantizer_is_the_exported_quantize_linear():
    spec = ActSpec(8, static_amax=2.5, clip_ratio=0.9)
    x = torch.randn(7, 32) * 2
    codes, scale = reference.quantize_rows(x, 8, static_scale=spec.static_scale)
    assert torch.equal(codes.float() * scale[:, None], static_quant_dequant(x, spec))


# (M, N, K, groups): M = 1, N odd, K = 96 not a multiple of the 64 tile, groups of 32 crossing tiles
DEQUANTS = [(1, 17, 96, 3), (33, 40, 200, 1), (4, 65, 128, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed,asymmetric", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("m,n,k,groups", DEQUANTS)
def test_dequant_gemm_matches_the_reference(m, n, k, groups, packed, asymmetric, dtype):
    g = torch.Generator().manual_seed(m * n)
    low, high = (0, 16) if asymmetric else (-8, 8)
    codes = torch.randint(low, high, (n, k), generator=g).to(torch.uint8 if asymmetric else torch.int8)
    zero = torch.randint(0, 16, (n, groups), generator=g).float().to(DEVICE) if asymmetric else None
    w = (pack_int4(codes) if packed else codes).to(DEVICE)
    scale, x = (torch.rand(n, groups, generator=g) / 8).to(DEVICE), torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    y = ops.dequant_gemm(x, w, scale, zero, bias, packed)
    expected = reference.dequant_gemm(x, w, scale, zero, bias, packed)
    assert y.dtype == dtype
    # float32: another summation order; bfloat16: the product rounded once, then the bias added
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, expected, **tolerance)


def test_operations_refuse_operands_that_do_not_fit():
    a, w, w_scale, a_scale, _ = gemm_operands(4, 8, 64, 2, True)
    with pytest.raises(ConfigError, match="holds 64 inputs"):
        ops.int_gemm(a[:, :32], a_scale, w, w_scale, packed=True)
    with pytest.raises(ConfigError, match="int8 activations"):
        ops.int_gemm(a.float(), a_scale, w, w_scale, packed=True)
    with pytest.raises(ConfigError, match="Hadamard block"):
        ops.quantize_rows(torch.zeros(2, 96, device=DEVICE), 4, hadamard_block=64)
    with pytest.raises(ConfigError, match="up to 7 bits"):
        ops.quantize_rows(torch.zeros(2, 96, device=DEVICE), 8, symmetric=False)


def test_operations_fall_back_to_the_references_where_triton_does_not_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels always run")
    monkeypatch.delenv("TRITON_INTERPRET")
    a, w, w_scale, a_scale, bias = gemm_operands(5, 9, 64, 2, True)
    assert not ops.triton_runs(a)
    assert torch.equal(ops.int_gemm(a, a_scale, w, w_scale, bias, packed=True),
                       reference.int_gemm(a, a_scale, w, w_scale, bias, packed=True))  # fmt: skip


def test_pack_int4_low_nibble_first_and_round_trip():
    signed = torch.tensor([[-8, 7, 0, -1, 3, -4]], dtype=torch.int8)
    packed = pack_int4(signed)
    assert packed.tolist() == [[0x78, 0xF0, 0xC3]]  # (-8 & 15) | (7 << 4) = 0x78 ...
    assert torch.equal(unpack_int4(packed, signed=True), signed)
    unsigned = torch.randint(0, 16, (5, 8), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(unsigned), signed=False), unsigned)
    with pytest.raises(ConfigError, match="even last dimension"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
