"""What happened at each denoising step: the record the teacher probe and the parity metrics read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from faircalib.sampling.llada import Decision


@dataclass(frozen=True)
class StepRecord:
    """One step of one batch. All tensors are [B, L] over the whole sequence (prompt included).

    ``tokens``: the state the denoiser saw (before this step's commits).
    ``committed``: positions unmasked by this step; ``committed_tokens`` = tokens written there.
    ``top1`` / ``top1_prob`` / ``margin``: the denoiser's argmax token, its probability, p1 - p2;
    ``top2`` / ``logit_gap``: the runner-up token and the top-1 minus runner-up logit (all after the logit
    shift, before any temperature or filtering).
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
    top2: torch.Tensor
    logit_gap: torch.Tensor


# StepRecord's tensor fields and their dtypes
RECORDED = {
    "tokens": torch.long, "committed": torch.bool, "committed_tokens": torch.long, "top1": torch.long,
    "top1_prob": torch.float32, "margin": torch.float32, "confidence": torch.float32, "top2": torch.long,
    "logit_gap": torch.float32,
}  # fmt: skip


@dataclass
class Trajectory:
    """The steps of one batch's run. ``allocate`` gives it one [steps, B, L] tensor per field, which each
    ``StepRecord`` views: allocated once before the run, not as small tensors between every step's large
    temporaries, whose freed space they would pin (the host's resident set then grows with the prompts)."""

    prompt_length: int
    steps: list[StepRecord] = field(default_factory=list)
    buffers: dict[str, torch.Tensor] | None = None

    @classmethod
    def allocate(cls, prompt_length: int, n_steps: int, shape: torch.Size, device: torch.device) -> Trajectory:
        buffers = {name: torch.empty((n_steps, *shape), dtype=dtype, device=device) for name, dtype in RECORDED.items()}
        return cls(prompt_length, buffers=buffers)

    def stacked(self, name: str) -> torch.Tensor:
        """Field ``name`` of every recorded step, [steps, B, L]: the allocated buffer itself, no copy, when
        there is one."""
        if self.buffers is not None:
            return self.buffers[name][: len(self.steps)]
        return torch.stack([getattr(step, name) for step in self.steps])


@dataclass(frozen=True)
class GenerationResult:
    """``tokens``: [B, prompt + gen] final sequences; ``trajectory`` when recording was asked for."""

    tokens: torch.Tensor
    prompt_length: int
    trajectory: Trajectory | None = None

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]


class TopTwo(NamedTuple):
    """The two best tokens of each position's distribution; every field [B, L]."""

    top1: torch.Tensor
    top2: torch.Tensor
    top1_prob: torch.Tensor
    margin: torch.Tensor  # p1 - p2
    logit_gap: torch.Tensor  # logit1 - logit2 = log p1 - log p2


def top_two(logits: torch.Tensor) -> TopTwo:
    """[B, L, V] logits -> the two best tokens, the best one's probability and both gaps between them."""
    logits = logits.float()
    top = logits.topk(2, dim=-1)
    probs = torch.exp(top.values - torch.logsumexp(logits, dim=-1, keepdim=True))
    return TopTwo(
        top.indices[..., 0], top.indices[..., 1], probs[..., 0], probs[..., 0] - probs[..., 1],
        top.values[..., 0] - top.values[..., 1],
    )  # fmt: skip


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
    best = top_two(logits)
    values = {
        "tokens": tokens, "committed": decision.committed,
        "committed_tokens": torch.where(decision.committed, decision.candidates, tokens), "top1": best.top1,
        "top1_prob": best.top1_prob, "margin": best.margin, "confidence": decision.confidence, "top2": best.top2,
        "logit_gap": best.logit_gap,
    }  # fmt: skip
    if trajectory.buffers is not None:
        values = {name: trajectory.buffers[name][len(trajectory.steps)].copy_(v) for name, v in values.items()}
    else:
        values = {name: v.to(RECORDED[name], copy=True) for name, v in values.items()}
    trajectory.steps.append(StepRecord(step=step, block=block, **values))
