"""Plain-torch references of the Triton kernels (``faircalib.kernels.ops``): what they compute, on any device.
They are the kernels' test oracle and what ``ops`` runs where Triton cannot (a CPU without the interpreter).

Conventions: a weight is [N, K] codes (int8, or two int4 a byte as ``int4.pack_int4`` lays them out) with
scales [N, G] and, when asymmetric, zero points [N, G] over groups of K // G inputs; activations are [M, K]
rows quantized per row (token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faircalib.kernels.hadamard import apply_block_hadamard
from faircalib.kernels.int4 import unpack_int4

TINY_SCALE = 1e-10  # the smallest activation scale: a row of zeros quantizes to zeros, not NaN


def weight_codes(codes: torch.Tensor, packed: bool, signed: bool = True) -> torch.Tensor:
    """int8 [N, K] codes of a weight held as int8 / uint8 [N, K] or packed uint8 [N, K // 2]."""
    return unpack_int4(codes, signed) if packed else codes


def quantize_rows(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    static_scale: float | None = None,
    hadamard_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization of x [M, K]: zero-point-centred int8 codes [M, K] and float32 scales [M], so that
    x ~ codes * scale[:, None].

    ``hadamard_block`` > 0 first applies the online block Hadamard (in x's dtype, as the model's own
    ``OnlineHadamard`` does). A ``static_scale`` quantizes every row on that one scale (symmetric), as
    ``torch.ops.quantized_decomposed.quantize_per_tensor`` does: by multiplying with its inverse.
    """
    if hadamard_block:
        x = apply_block_hadamard(x, hadamard_block)
    xf = x.float()
    if static_scale is not None:
        qmax = 2 ** (bits - 1) - 1
        codes = torch.round(xf * (1.0 / static_scale)).clamp(-qmax - 1, qmax)
        return codes.to(torch.int8), torch.full((x.shape[0],), static_scale, dtype=torch.float32, device=x.device)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax).clamp_min(TINY_SCALE)
        codes = torch.round(xf / scale).clamp(-qmax - 1, qmax)
        return codes.to(torch.int8), scale.squeeze(-1)
    qmax = 2**bits - 1
    hi = xf.amax(dim=-1, keepdim=True).clamp_min(0) * clip_ratio
    lo = xf.amin(dim=-1, keepdim=True).clamp_max(0) * clip_ratio
    scale = ((hi - lo) / qmax).clamp_min(TINY_SCALE)
    zero = torch.round(-lo / scale)
    codes = torch.round(xf / scale + zero).clamp(0, qmax) - zero
    return codes.to(torch.int8), scale.squeeze(-1)


def int_accumulate(a_codes: torch.Tensor, w_codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Exact integer products per weight group: int32 [G, M, N] = sum over the group's k of a[m, k] * w[n, k].

    a_codes [M, K] int8, w_codes [N, K] int8."""
    m, k = a_codes.shape
    a = a_codes.double().reshape(m, groups, k // groups).transpose(0, 1)  # [G, M, K/G]
    w = w_codes.double().reshape(-1, groups, k // groups).permute(1, 2, 0)  # [G, K/G, N]
    # float64 sums of integers are exact below 2^53, and a float64 GEMM is fast where an integer one is not
    return torch.bmm(a, w).to(torch.int32)


def int_gemm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    packed: bool = False,
) -> torch.Tensor:
    """y [M, N] = (sum_g acc_g[m, n] * w_scale[n, g]) * a_scale[m] + bias[n], in ``out_dtype``: the integer
    GEMM of centred activation codes and weight codes, scales applied after each group's integer sum.

    a_codes [M, K] int8, a_scale [M] float32, w_codes int8 [N, K] (or packed uint8 [N, K // 2] when
    ``packed``), w_scale [N, G] float32, bias [N] or None.
    """
    w = weight_codes(w_codes, packed)
    partial = int_accumulate(a_codes, w, w_scale.shape[1]).float()  # [G, M, N]
    y = (partial * w_scale.float().T.unsqueeze(1)).sum(0) * a_scale.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def dequantize(w_codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, packed: bool) -> torch.Tensor:
    """float32 [N, K] = (codes - zero) * scale, per group."""
    codes = weight_codes(w_codes, packed, signed=w_zero is None).float()
    n, k = codes.shape
    grouped = codes.reshape(n, w_scale.shape[1], -1)
    if w_zero is not None:
        grouped = grouped - w_zero.float().unsqueeze(-1)
    return (grouped * w_scale.float().unsqueeze(-1)).reshape(n, k)


def dequant_gemm(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    packed: bool = True,
) -> torch.Tensor:
    """y [M, N] = x @ W^T + bias in x's dtype, W the dequantized weight cast to x's dtype (weight-only
    quantization: W4A16). x [M, K]; weight as in ``dequantize``."""
    return F.linear(x, dequantize(w_codes, w_scale, w_zero, packed).to(x.dtype), bias)
