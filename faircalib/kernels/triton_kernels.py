"""Triton kernels of the low-bit student's linears. Launch them through ``faircalib.kernels.ops``, which checks
shapes and picks tiles; ``faircalib.kernels.reference`` says what each computes.

- ``int_gemm_kernel``: int8 x int8 products on integer tensor cores (int4 weights unpacked in registers),
  int32 sums per weight group, scales and bias in the epilogue.
- ``quantize_rows_kernel``: per-row activation quantization, optionally after the online block Hadamard.
- ``dequant_gemm_kernel``: int4 / int8 weights dequantized in registers and multiplied in x's dtype (W4A16).

Rounding is to nearest even through a float32 magic number: ``libdevice.rint`` does not run under the
interpreter, and this agrees with ``torch.round`` for every |v| < 2^22.
"""

from __future__ import annotations

import triton
import triton.language as tl

_ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + it - it rounds v to an integer, ties to even, |v| < 2^22


@triton.jit
def _rint(v):
    return (v + _ROUNDER) - _ROUNDER


@triton.jit
def _div(a, b):
    """a / b correctly rounded (Triton's own float32 division is approximate on a GPU); b may be a scalar."""
    return tl.math.div_rn(a, b + tl.zeros_like(a))


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """float32 v in dtype, rounded to nearest even. bfloat16 is rounded on the bits: the interpreter's own
    float32 -> bfloat16 cast truncates, and tests must see what a GPU computes."""
    if dtype == tl.bfloat16:  # noqa: SIM300
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return v.to(dtype)


@triton.jit
def _weight_tile(w_ptr, offs_n, k_start, N, K, stride_wn, BLOCK_K: tl.constexpr, PACKED: tl.constexpr,
                 SIGNED: tl.constexpr):  # fmt: skip
    """int8 weight codes [BLOCK_N, BLOCK_K] of rows offs_n, inputs k_start.. (zeros outside the matrix); packed
    weights need k_start even."""
    if PACKED:
        byte_k = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (byte_k[None, :] < K // 2)
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte_k[None, :], mask=mask, other=0)
        low = (packed & 0xF).to(tl.int8)
        high = (packed >> 4).to(tl.int8)
        codes = tl.reshape(tl.join(low, high), (offs_n.shape[0], BLOCK_K))  # low nibble first
        if SIGNED:
            codes = tl.where(codes > 7, codes - 16, codes).to(tl.int8)
        return codes
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile, tiles ordered in bands of GROUP_M rows so that
    neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def int_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr,
    M, N, K, group_size, n_groups,
    stride_am, stride_wn, stride_sn, stride_ym,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, n_groups):
        exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for start in range(0, group_size, BLOCK_K):
            in_group = start + tl.arange(0, BLOCK_K)
            offs_k = g * group_size + in_group
            a_mask = (offs_m[:, None] < M) & (in_group[None, :] < group_size) & (offs_k[None, :] < K)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=a_mask, other=0)
            w = _weight_tile(w_ptr, offs_n, g * group_size + start, N, K, stride_wn, BLOCK_K, PACKED, True)
            exact += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        w_scale = tl.load(w_scale_ptr + offs_n * stride_sn + g, mask=offs_n < N, other=0.0)
        acc += exact.to(tl.float32) * w_scale[None, :]
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    y = acc * a_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], _cast(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_wn, stride_sn, stride_ym,
    PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        codes = _weight_tile(w_ptr, offs_n, start, N, K, stride_wn, BLOCK_K, PACKED, not HAS_ZERO).to(tl.float32)
        qmask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        group = offs_n[:, None] * stride_sn + offs_k[None, :] // group_size
        if HAS_ZERO:
            codes -= tl.load(zero_ptr + group, mask=qmask, other=0.0)
        w = _cast(codes * tl.load(scale_ptr + group, mask=qmask, other=0.0), x.dtype)
        if UPCAST:  # float32 operands take IEEE products, not TF32 (as torch's float32 matmul)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], _cast(acc, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_hadamard(v, BLOCK: tl.constexpr, STAGES: tl.constexpr, DTYPE: tl.constexpr, inv_sqrt):
    """v [BLOCK] (float32 values of DTYPE) times H_BLOCK / sqrt(BLOCK): the butterflies of
    ``hadamard.apply_block_hadamard``, each stage rounded to DTYPE as torch rounds it."""
    for stage in tl.static_range(STAGES):
        half: tl.constexpr = 1 << stage
        pairs = tl.permute(tl.reshape(v, (BLOCK // (2 * half), 2, half)), (0, 2, 1))
        low, high = tl.split(pairs)
        both = tl.join(_cast(low + high, DTYPE).to(tl.float32), _cast(low - high, DTYPE).to(tl.float32))
        v = tl.reshape(tl.permute(both, (0, 2, 1)), (BLOCK,))
    return _cast(v * inv_sqrt, DTYPE).to(tl.float32)


@triton.jit
def _row_chunk(x_ptr, row, start, K, stride_xm, BLOCK: tl.constexpr, HADAMARD: tl.constexpr, inv_sqrt):
    """Float32 values of x[row, start:start + BLOCK] (block-Hadamard transformed when asked; zeros past K)."""
    offs = start + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    v = v.to(tl.float32)
    if HADAMARD:
        v = _block_hadamard(v, BLOCK, HADAMARD, dtype, inv_sqrt)
    return offs, v


@triton.jit
def quantize_rows_kernel(
    x_ptr, codes_ptr, scale_ptr,
    K, stride_xm, stride_cm, clip_ratio, static_scale, static_inverse, inv_sqrt,
    QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, STATIC: tl.constexpr, HADAMARD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program a row: the row's range in a first pass, its codes in a second (the Hadamard, when asked,
    recomputed rather than written out). HADAMARD: 0, or log2 of the Hadamard block, which is then BLOCK."""
    row = tl.program_id(0)
    if STATIC:
        scale = static_scale
        zero = 0.0
    else:
        hi = tl.zeros((BLOCK,), dtype=tl.float32)
        lo = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs, v = _row_chunk(x_ptr, row, start, K, stride_xm, BLOCK, HADAMARD, inv_sqrt)
            if SYMMETRIC:
                hi = tl.maximum(hi, tl.abs(v))
            else:
                hi = tl.maximum(hi, v)
                lo = tl.minimum(lo, v)
        if SYMMETRIC:
            scale = tl.maximum(_div(tl.max(hi, 0) * clip_ratio, QMAX * 1.0), 1e-10)
            zero = 0.0
        else:
            span = tl.max(hi, 0) * clip_ratio - tl.min(lo, 0) * clip_ratio
            scale = tl.maximum(_div(span, QMAX * 1.0), 1e-10)
            zero = _rint(_div(-(tl.min(lo, 0) * clip_ratio), scale))
    for start in range(0, K, BLOCK):
        offs, v = _row_chunk(x_ptr, row, start, K, stride_xm, BLOCK, HADAMARD, inv_sqrt)
        if STATIC:
            q = tl.minimum(tl.maximum(_rint(v * static_inverse), -QMAX - 1.0), QMAX * 1.0)
        elif SYMMETRIC:
            q = tl.minimum(tl.maximum(_rint(_div(v, scale)), -QMAX - 1.0), QMAX * 1.0)
        else:
            q = tl.minimum(tl.maximum(_rint(_div(v, scale) + zero), 0.0), QMAX * 1.0) - zero
        tl.store(codes_ptr + row * stride_cm + offs, q.to(tl.int8), mask=offs < K)
    tl.store(scale_ptr + row, scale)
