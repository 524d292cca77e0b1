"""The (token-weighted) second moment of a linear layer's inputs: the Hessian of its reconstruction loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from faircalib.calib.forward import state_slices
from faircalib.calib.hooks import hooked
from faircalib.calib.quant import ActSpec, fake_quant_activation
from faircalib.models.base import BlockContext, Denoiser

SLICE_BYTES = 2**28


def weighted_gram(
    x: torch.Tensor, weights: torch.Tensor | None = None, slice_bytes: int = SLICE_BYTES
) -> tuple[torch.Tensor, float]:
    """sum_t w_t x_t x_t^T [K, K] float64 and sum_t w_t for inputs x [..., K] and token weights [...]
    (default 1).

    Accumulated in float64: 8B-scale layers sum millions of tokens, and the Hessian feeds a Cholesky
    factorisation. The rows are cast a slice of about ``slice_bytes`` at a time, since a float64 copy of a
    whole calibration chunk is large: 49k tokens of LLaDA-8B's 12288-wide FFN input are 4.8 GB. Each
    slice, its rows scaled by sqrt(w), is one matmul.
    """
    rows = x.reshape(-1, x.shape[-1])
    w = None
    if weights is not None:
        w = weights.reshape(-1).to(device=rows.device, dtype=torch.float64)
        if w.shape[0] != rows.shape[0]:
            raise ValueError(f"{w.shape[0]} token weights for {rows.shape[0]} tokens")
        if bool((w < 0).any()):
            raise ValueError("token weights must be non-negative")
    step = max(1, slice_bytes // (8 * rows.shape[1]))
    gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].double()
        if w is not None:
            part = part * w[start : start + step].sqrt().unsqueeze(1)
        gram.addmm_(part.T, part)
    return gram, float(rows.shape[0]) if w is None else float(w.sum())


def accumulate_hessian(
    hessian: torch.Tensor | None, total: float, x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Add one batch to a running (sum, total-weight) pair; ``hessian`` None starts a new one.
    The normalised Hessian is ``hessian / total``."""
    gram, weight = weighted_gram(x, weights)
    return (gram if hessian is None else hessian + gram), total + weight


@torch.no_grad()
def collect_hessians(
    model: Denoiser,
    block: nn.Module,
    groups: tuple[tuple[str, ...], ...],
    inputs: Sequence[torch.Tensor],
    contexts: Sequence[BlockContext],
    weights: Sequence[torch.Tensor],
    acts: Mapping[str, ActSpec],
) -> dict[str, torch.Tensor]:
    """Normalised weighted Hessian [K, K] (float64) per linear group, keyed by the group's first linear.

    Inputs are fake-quantized first (``acts``, by the same key): GPTQ must see what the quantized layer
    will multiply.
    """
    sums: dict[str, tuple[torch.Tensor | None, float]] = {group[0]: (None, 0.0) for group in groups}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def collect(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = fake_quant_activation(args[0], acts[name])
            sums[name] = accumulate_hessian(*sums[name], x, current["weights"])

        return collect

    with hooked(block, {g[0]: hook(g[0]) for g in groups}, pre=True):
        for x, ctx, w in zip(inputs, contexts, weights, strict=True):
            for part in state_slices(model, block, x, ctx):
                current["weights"] = w[part]
                model.run_block(block, x[part], ctx)
    return {name: h / total for name, (h, total) in sums.items()}
