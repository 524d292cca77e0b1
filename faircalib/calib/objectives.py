"""What the learned parts of Stage II minimise, where, and the one optimiser set-up they share."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from faircalib.models.base import DenoiserSpec


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j ||output_j - target_j||^2 / sum_j w_j over tokens; output/target [S, L, D], weights [S, L]."""
    per_token = (output.float() - target.float()).pow(2).sum(-1)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def weighted_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j KL(p_teacher(j) || p_student(j)) / sum_j w_j; logits [S, L, V], weights [S, L]."""
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def decision_masks(tokens: Sequence[torch.Tensor], spec: DenoiserSpec) -> list[torch.Tensor]:
    """Per chunk [S, L] bool: the logit positions that decide masked tokens (shifted for Dream-style models)."""
    masks = []
    for t in tokens:
        masked = t == spec.mask_token_id
        if spec.logit_shift:  # position j is decided by the logits at j - 1 (and position 0 by its own)
            shifted = torch.zeros_like(masked)
            shifted[:, :-1] = masked[:, 1:]
            shifted[:, 0] |= masked[:, 0]
            masked = shifted
        masks.append(masked)
    return masks


def adam_cosine(
    params: Sequence[torch.Tensor], lr: float, steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam whose step size decays from ``lr`` to zero on a cosine over ``steps``: at a constant step size the
    last minibatches decide where the solution ends up (docs/DESIGN.md, "Stage II: the rotation")."""
    optimizer = torch.optim.Adam(params, lr=lr)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
