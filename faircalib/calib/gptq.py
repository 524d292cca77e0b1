"""GPTQ (Frantar et al., 2023): quantize W column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian, with lazy block updates.

Groups are laid out along the original K order, so exported scales stay contiguous even with act-order
(their parameters are computed from W before any update, "static groups").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from faircalib.calib.quant import WeightSpec, dequantize_weight, quantize_weight, weight_qparams
from faircalib.errors import FaircalibError

log = logging.getLogger(__name__)


class CholeskyError(FaircalibError):
    """The Hessian stayed indefinite after every damping retry."""


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # [N, G]
    zero: torch.Tensor | None  # [N, G]
    damp: float  # relative damping that succeeded
    retries: int  # extra damping rounds needed

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, max_retries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping tenfold (from at least
    1e-3) on failure.

    Returns (factor, damping used, retries). A retry is logged: it means the calibration inputs
    barely span the layer's input space.
    """
    mean_diag = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for retry in range(max_retries + 1):
        relative = damp if retry == 0 else max(damp, 1e-3) * 10**retry
        try:
            lower = torch.linalg.cholesky(hessian + relative * mean_diag * eye)
            inverse = torch.cholesky_inverse(lower)
            factor = torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
        if retry:
            log.warning("GPTQ: Hessian not positive definite at damping %g; succeeded at %g", damp, relative)
        return factor, relative, retry
    raise CholeskyError(f"Hessian not positive definite even with damping {relative:g}")


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ needs of one Hessian, computed once for every linear that reads the same input (q, k, v)."""

    factor: torch.Tensor  # [K, K] float64: upper Cholesky factor of the damped inverse, in ``perm``'s order
    perm: torch.Tensor  # [K] the column order (descending diagonal with act-order, else the identity)
    dead: torch.Tensor  # [K] bool: inputs that were always zero
    act_order: bool
    damp: float  # relative damping that succeeded
    retries: int


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> PreparedHessian:
    """Fix dead inputs (diagonal 1, as in the reference), order the columns, factorise (``inverse_hessian_factor``)."""
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    k = h.shape[0]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=h.device)
    factor, used_damp, retries = inverse_hessian_factor(h[perm][:, perm], damp)
    return PreparedHessian(factor, perm, dead, act_order, used_damp, retries)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    spec: WeightSpec,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    clip: float | torch.Tensor = 1.0,
) -> GPTQResult:
    """Quantize w [N, K] against the input Hessian [K, K] (any positive scale: it is normalised by damping),
    or one already prepared (then ``damp`` and ``act_order`` are its own).

    ``clip`` shrinks the quantization range as in ``weight_qparams``. Columns whose inputs were always
    zero ("dead") are set to zero before quantization, as in the reference.
    """
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, damp, act_order)
    n, k = w.shape
    group = k // spec.groups(k)
    w = w.detach().double().clone()
    w[:, prepared.dead] = 0
    scale, zero = weight_qparams(w, spec, clip)  # static groups; recomputed per block without act-order
    w = w[:, prepared.perm]
    dynamic = not prepared.act_order and group < k
    if dynamic:
        block_size = max(group, block_size // group * group)  # groups never straddle a block
    codes = torch.zeros(n, k, dtype=spec.code_dtype, device=w.device)
    group_of = (prepared.perm // group).tolist()  # one host transfer, not one per column
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = _quantize_block(
            w[:, start:end].clone(), codes, start, prepared.factor[start:end, start:end], scale, zero, spec,
            group_of, group if dynamic else None, clip,
        )  # fmt: skip
        w[:, end:] -= errors @ prepared.factor[start:end, end:]
    inverse = torch.argsort(prepared.perm)
    return GPTQResult(
        codes=codes[:, inverse],
        scale=scale.float(),
        zero=zero.float() if zero is not None else None,
        damp=prepared.damp,
        retries=prepared.retries,
    )


def _quantize_block(
    block: torch.Tensor,
    codes: torch.Tensor,
    start: int,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: WeightSpec,
    group_of: list[int],
    dynamic_group: int | None,
    clip: float | torch.Tensor,
) -> torch.Tensor:
    """Quantize the columns of one lazy block [N, B] (starting at ``start``) into ``codes``, pushing each
    column's error onto the block's later columns; return the scaled errors [N, B] for the columns beyond.
    ``dynamic_group``: the group size whose scales are set as each group is reached (no act-order)."""
    errors = torch.zeros_like(block)
    for i in range(block.shape[1]):
        column = start + i
        if dynamic_group is not None and column % dynamic_group == 0:
            g = column // dynamic_group
            group_clip = clip[:, g : g + 1] if isinstance(clip, torch.Tensor) else clip
            s, z = weight_qparams(
                block[:, i : i + dynamic_group],
                WeightSpec(spec.bits, None, spec.symmetric, spec.fp16_scales),
                group_clip,
            )
            scale[:, g : g + 1] = s
            if zero is not None:
                zero[:, g : g + 1] = z
        g = group_of[column]
        col_scale = scale[:, g : g + 1]
        col_zero = zero[:, g : g + 1] if zero is not None else None
        q = quantize_weight(block[:, i : i + 1], col_scale, col_zero, spec)
        codes[:, column] = q[:, 0]
        error = (block[:, i] - dequantize_weight(q, col_scale, col_zero)[:, 0]) / hinv[i, i]
        block[:, i:] -= error.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        errors[:, i] = error
    return errors
