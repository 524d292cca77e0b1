"""The (token-weighted) second moment of a linear layer's inputs: the Hessian of its reconstruction loss."""

from __future__ import annotations

import torch


def weighted_gram(x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """sum_t w_t x_t x_t^T and sum_t w_t for inputs x [..., K] and token weights [...] (default 1).

    Scaling each row by sqrt(w) keeps it one matmul. Accumulated in float64: 8B-scale layers sum
    millions of tokens, and the Hessian feeds a Cholesky factorisation.
    """
    rows = x.reshape(-1, x.shape[-1]).double()
    if weights is None:
        return rows.T @ rows, float(rows.shape[0])
    w = weights.reshape(-1).double()
    if w.shape[0] != rows.shape[0]:
        raise ValueError(f"{w.shape[0]} token weights for {rows.shape[0]} tokens")
    if bool((w < 0).any()):
        raise ValueError("token weights must be non-negative")
    scaled = rows * w.sqrt().unsqueeze(1)
    return scaled.T @ scaled, float(w.sum())


def accumulate_hessian(
    hessian: torch.Tensor | None, total: float, x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Add one batch to a running (sum, total-weight) pair; ``hessian`` None starts a new one.
    The normalised Hessian is ``hessian / total``."""
    gram, weight = weighted_gram(x, weights)
    return (gram if hessian is None else hessian + gram), total + weight
