"""The (token-weighted) second moment of a linear layer's inputs: the Hessian of its reconstruction loss."""

from __future__ import annotations

import torch

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
