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


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightSpec,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    clip: float | torch.Tensor = 1.0,
) -> GPTQResult:
    """Quantize w [N, K] against the input Hessian [K, K] (any positive scale: it is normalised by damping).

    ``clip`` shrinks the quantization range as in ``weight_qparams``. Columns whose inputs were always
    zero ("dead") are set to zero before quantization, as in the reference.
    """
    n, k = w.shape
    groups = spec.groups(k)
    group = k // groups
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scale, zero = weight_qparams(w, spec, clip)  # static groups; recomputed below without act-order
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    factor, used_damp, retries = inverse_hessian_factor(h, damp)

    if not act_order and group < k:
        block_size = max(group, block_size // group * group)  # groups never straddle a block
    codes = torch.zeros(n, k, dtype=spec.code_dtype, device=w.device)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hinv = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if not act_order and group < k and column % group == 0:
                g = column // group
                group_clip = clip[:, g : g + 1] if isinstance(clip, torch.Tensor) else clip
                s, z = weight_qparams(block[:, i : i + group], WeightSpec(spec.bits, None, spec.symmetric), group_clip)
                scale[:, g : g + 1], zero_g = s, z
                if zero is not None:
                    zero[:, g : g + 1] = zero_g
            g = int(perm[column]) // group
            col_scale = scale[:, g : g + 1]
            col_zero = zero[:, g : g + 1] if zero is not None else None
            q = quantize_weight(block[:, i : i + 1], col_scale, col_zero, spec)
            codes[:, column] = q[:, 0]
            error = (block[:, i] - dequantize_weight(q, col_scale, col_zero)[:, 0]) / hinv[i, i]
            block[:, i:] -= error.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ factor[start:end, end:]

    inverse = torch.argsort(perm)
    return GPTQResult(
        codes=codes[:, inverse],
        scale=scale.float(),
        zero=zero.float() if zero is not None else None,
        damp=used_damp,
        retries=retries,
    )
