"""The low-bit linear's operations: Triton kernels where Triton runs (CUDA tensors, or any tensor under
``TRITON_INTERPRET=1``, which is how the tests run them on a CPU), else their torch references.

Each function takes 2-D operands, checks them, and returns what ``faircalib.kernels.reference`` says.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from faircalib.errors import ConfigError
from faircalib.kernels import reference


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``t``'s device here."""
    if importlib.util.find_spec("triton") is None:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    # imported on first use: triton.jit reads TRITON_INTERPRET when the kernels are defined
    from faircalib.kernels import triton_kernels

    return triton_kernels


def _tiles(m: int, t: torch.Tensor, block_k: int) -> dict:
    """Tile sizes: on a GPU the row tile follows M (small M is a weight-bandwidth-bound GEMV); the
    interpreter gets large tiles, since it pays per program rather than per element."""
    if not t.is_cuda:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    warps = 4 if block_m <= 64 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=4)


def _grid(m: int, n: int, tiles: dict) -> tuple[int]:
    return (-(-m // tiles["BLOCK_M"]) * -(-n // tiles["BLOCK_N"]),)


def _check_weight(k: int, w_codes: torch.Tensor, w_scale: torch.Tensor, packed: bool) -> int:
    """The weight's group size, after checking its shapes against K."""
    n, stored = w_codes.shape
    if stored * (2 if packed else 1) != k:
        raise ConfigError(f"the weight holds {stored * (2 if packed else 1)} inputs a row, the activations {k}")
    if w_scale.shape[0] != n or k % w_scale.shape[1]:
        raise ConfigError(f"weight scales {list(w_scale.shape)} do not fit a [{n}, {k}] weight")
    group = k // w_scale.shape[1]
    if packed and group % 2:
        raise ConfigError(f"packed int4 weights need an even group size, got {group}")
    return group


def quantize_rows(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    static_scale: float | None = None,
    hadamard_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and float32 scales [M] of x [M, K]: ``reference.quantize_rows``."""
    if x.ndim != 2:
        raise ConfigError(f"quantize_rows takes [M, K] rows, got {list(x.shape)}")
    if not symmetric and bits > 7:
        raise ConfigError("centred asymmetric codes fit int8 only up to 7 bits")
    hadamard_block = 0 if hadamard_block == 1 else hadamard_block
    if hadamard_block and (x.shape[1] % hadamard_block or hadamard_block & (hadamard_block - 1)):
        raise ConfigError(f"Hadamard block {hadamard_block} is not a power of two dividing {x.shape[1]}")
    if not triton_runs(x):
        return reference.quantize_rows(x, bits, symmetric, clip_ratio, static_scale, hadamard_block)
    x = x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block = hadamard_block or min(1 << (k - 1).bit_length(), 4096)
    static = static_scale is not None
    _kernels().quantize_rows_kernel[(m,)](
        x, codes, scale, k, x.stride(0), codes.stride(0), clip_ratio,
        static_scale if static else 1.0, 1.0 / static_scale if static else 1.0,
        1.0 / hadamard_block**0.5 if hadamard_block else 1.0,
        QMAX=2 ** (bits - 1) - 1 if symmetric or static else 2**bits - 1, SYMMETRIC=symmetric, STATIC=static,
        HADAMARD=hadamard_block.bit_length() - 1 if hadamard_block else 0, BLOCK=block,
    )  # fmt: skip
    return codes, scale


def int_gemm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    packed: bool = False,
) -> torch.Tensor:
    """y [M, N] of int8 activation codes [M, K] and int8 (or packed int4) weight codes: ``reference.int_gemm``."""
    if a_codes.dtype != torch.int8 or w_codes.dtype != (torch.uint8 if packed else torch.int8):
        raise ConfigError(f"int_gemm takes int8 activations and {'packed uint8' if packed else 'int8'} weights, "
                          f"got {a_codes.dtype} and {w_codes.dtype}")  # fmt: skip
    m, k = a_codes.shape
    group = _check_weight(k, w_codes, w_scale, packed)
    if not triton_runs(a_codes):
        return reference.int_gemm(a_codes, a_scale, w_codes, w_scale, bias, out_dtype, packed)
    a_codes, w_codes, w_scale = a_codes.contiguous(), w_codes.contiguous(), w_scale.float().contiguous()
    n = w_codes.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=a_codes.device)
    # a K tile within one weight group (int8 tensor cores take K tiles of 32 and up)
    tiles = _tiles(m, a_codes, block_k=min(128, max(32, 1 << (group.bit_length() - 1))))
    _kernels().int_gemm_kernel[_grid(m, n, tiles)](
        a_codes, a_scale.float().contiguous(), w_codes, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, group, w_scale.shape[1], a_codes.stride(0), w_codes.stride(0), w_scale.stride(0), y.stride(0),
        PACKED=packed, HAS_BIAS=bias is not None, **tiles,
    )  # fmt: skip
    return y


def dequant_gemm(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    packed: bool = True,
) -> torch.Tensor:
    """y [M, N] of x [M, K] and a weight dequantized in registers: ``reference.dequant_gemm``."""
    m, k = x.shape
    group = _check_weight(k, w_codes, w_scale, packed)
    if not triton_runs(x):
        return reference.dequant_gemm(x, w_codes, w_scale, w_zero, bias, packed)
    x, w_codes, w_scale = x.contiguous(), w_codes.contiguous(), w_scale.float().contiguous()
    n = w_codes.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = _tiles(m, x, block_k=64)
    zero = w_zero.float().contiguous() if w_zero is not None else w_scale
    # UPCAST: float32 operands, or the interpreter (its dot multiplies bfloat16 bits as integers); products of
    # bfloat16 values are exact in float32, so this is the tensor cores' arithmetic
    _kernels().dequant_gemm_kernel[_grid(m, n, tiles)](
        x, w_codes, w_scale, zero, bias if bias is not None else w_scale, y,
        m, n, k, group, x.stride(0), w_codes.stride(0), w_scale.stride(0), y.stride(0),
        PACKED=packed, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
        UPCAST=x.dtype == torch.float32 or not x.is_cuda, **tiles,
    )  # fmt: skip
    return y
