"""LLaDA's sampler (Nie et al., "Large Language Diffusion Models", 2025; ML-GSAI/LLaDA generate.py).

The generated region starts fully masked and is split into blocks decoded left to right. Within the
open block, each step predicts every masked token (Gumbel-max in float64 at temperature > 0), scores
it (its softmax probability, or uniform noise for 'random' remasking) and commits the best
``commit`` positions. Committed tokens are never remasked; positions past the block stay masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from faircalib.sampling.config import LLaDASampling
from faircalib.sampling.schedule import Schedule
from faircalib.sampling.trajectory import GenerationResult, Trajectory, record_step

Denoise = Callable[[torch.Tensor], torch.Tensor]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by Gumbel-max in float64 (low-precision Gumbel noise
    hurts generation quality, arXiv:2409.02908). Temperature 0 is plain argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def commit_top(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L]: the ``counts[b]`` highest-confidence positions of each row (torch.topk order)."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    for row in range(confidence.shape[0]):
        k = int(counts[row])
        if k:
            chosen[row, confidence[row].topk(k).indices] = True
    return chosen


@torch.no_grad()
def generate_llada(
    denoise: Denoise,
    prompt: torch.Tensor,
    sampling: LLaDASampling,
    schedule: Schedule,
    mask_id: int,
    eos_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    record: bool = False,
) -> GenerationResult:
    """prompt: [B, P] int64. ``schedule`` = ``plan(sampling, P)``. Returns [B, P + gen_length] tokens."""
    batch, prompt_len = prompt.shape
    x = torch.full((batch, schedule.total_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    is_prompt = torch.arange(schedule.total_length, device=x.device) < prompt_len
    trajectory = Trajectory(prompt_len) if record else None

    for index, step in enumerate(schedule.steps):
        masked = x == mask_id
        if sampling.cfg_scale > 0:
            unconditional = torch.where(is_prompt, mask_id, x)
            cond, uncond = denoise(torch.cat([x, unconditional])).chunk(2)
            logits = uncond + (sampling.cfg_scale + 1) * (cond - uncond)
        else:
            logits = denoise(x)
        if sampling.logits_eos_inf and eos_ids:
            logits = logits.clone()
            logits[..., eos_ids[0]] = -torch.inf

        x0 = gumbel_argmax(logits, sampling.temperature, generator)
        if sampling.remasking == "low_confidence":
            probs = torch.softmax(logits, dim=-1)
            confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        else:
            confidence = torch.rand(x0.shape, generator=generator, device=x0.device).to(logits.dtype)
        if sampling.confidence_eos_eot_inf:
            for token in eos_ids:
                confidence = confidence.masked_fill(x0 == token, -torch.inf)

        confidence = confidence.masked_fill(~masked, -torch.inf)
        confidence[:, prompt_len + step.block_end :] = -torch.inf
        x0 = torch.where(masked, x0, x)
        counts = torch.full((batch,), step.commit, dtype=torch.long)
        committed = commit_top(confidence, counts)
        record_step(trajectory, index, step.block, x, logits, committed, x0, confidence)
        x = torch.where(committed, x0, x)

    return GenerationResult(tokens=x, prompt_length=prompt_len, trajectory=trajectory)
