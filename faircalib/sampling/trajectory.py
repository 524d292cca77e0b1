"""What happened at each denoising step: the record the teacher probe and the parity metrics read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from faircalib.sampling.llada import Decision


@dataclass(frozen=True)
class StepRecord:
    """One step of one batch. All tensors are [B, L] over the whole sequence (prompt included).

    ``tokens``: the state the denoiser saw (before this step's commits).
    ``committed``: positions unmasked by this step; ``committed_tokens`` = tokens written there.
    ``top1`` / ``top1_prob`` / ``margin``: the denoiser's argmax token, its probability, p1 - p2
    (after the logit shift, before any temperature or filtering).
    ``confidence``: the score the sampler ranked positions by (-inf where a position was not eligible).
    """

    step: int
    block: int
    tokens: torch.Tensor
    committed: torch.Tensor
    committed_tokens: torch.Tensor
    top1: torch.Tensor
    top1_prob: torch.Tensor
    margin: torch.Tensor
    confidence: torch.Tensor


@dataclass
class Trajectory:
    prompt_length: int
    steps: list[StepRecord] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationResult:
    """``tokens``: [B, prompt + gen] final sequences; ``trajectory`` when recording was asked for."""

    tokens: torch.Tensor
    prompt_length: int
    trajectory: Trajectory | None = None

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]


def top1_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax token, its probability and the top-1 minus top-2 probability margin. [B, L, V] -> 3 x [B, L]."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0], top.values[..., 0] - top.values[..., 1]


def record_step(
    trajectory: Trajectory | None,
    step: int,
    block: int,
    tokens: torch.Tensor,
    logits: torch.Tensor,
    decision: Decision,
) -> None:
    if trajectory is None:
        return
    top1, top1_prob, margin = top1_stats(logits)
    trajectory.steps.append(
        StepRecord(
            step=step,
            block=block,
            tokens=tokens.clone(),
            committed=decision.committed.clone(),
            committed_tokens=torch.where(decision.committed, decision.candidates, tokens),
            top1=top1,
            top1_prob=top1_prob,
            margin=margin,
            confidence=decision.confidence.float(),
        )
    )
