"""LLaDA's sampler (Nie et al., "Large Language Diffusion Models", 2025; ML-GSAI/LLaDA generate.py).

The generated region starts fully masked and is split into blocks decoded left to right. Within the
open block, each step predicts every masked token (Gumbel-max in float64 at temperature > 0), scores
it (its softmax probability, uniform noise for 'random' remasking, or its position for 'left_to_right', the
order llama.cpp's diffusion CLI commits in when its tokens are greedy) and commits the best ``commit``
positions. Committed tokens are never remasked; positions past the block stay masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import LLaDASampling
from faircalib.sampling.schedule import ScheduleStep

Denoise = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Decision:
    """One step's decisions, all [B, L]: the token each position would take, the score positions were
    ranked by (-inf where not eligible), and which positions are committed now."""

    candidates: torch.Tensor
    confidence: torch.Tensor
    committed: torch.Tensor


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


def llada_logits(
    denoise: Denoise, x: torch.Tensor, prompt_len: int, sampling: LLaDASampling, spec: DenoiserSpec
) -> torch.Tensor:
    """The logits a step decides from: classifier-free guidance against the prompt-masked input
    (un + (cfg + 1)(cond - un)), and EOS forbidden when ``logits_eos_inf``."""
    if sampling.cfg_scale > 0:
        unconditional = x.clone()
        unconditional[:, :prompt_len] = spec.mask_token_id
        cond, uncond = denoise(torch.cat([x, unconditional])).chunk(2)
        logits = uncond + (sampling.cfg_scale + 1) * (cond - uncond)
    else:
        logits = denoise(x)
    if sampling.logits_eos_inf and spec.eos_token_ids:
        logits = logits.clone()
        logits[..., spec.eos_token_ids[0]] = -torch.inf
    return logits


def llada_decide(
    logits: torch.Tensor,
    x: torch.Tensor,
    step: ScheduleStep,
    prompt_len: int,
    sampling: LLaDASampling,
    spec: DenoiserSpec,
    generator: torch.Generator | None,
) -> Decision:
    masked = x == spec.mask_token_id
    x0 = gumbel_argmax(logits, sampling.temperature, generator)
    if sampling.remasking == "low_confidence":
        confidence = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif sampling.remasking == "left_to_right":
        confidence = -torch.arange(x0.shape[1], device=x0.device, dtype=logits.dtype).expand(x0.shape)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x0.device).to(logits.dtype)
    if sampling.confidence_eos_eot_inf:
        for token in spec.eos_token_ids:
            confidence = confidence.masked_fill(x0 == token, -torch.inf)
    confidence = confidence.masked_fill(~masked, -torch.inf)
    confidence[:, prompt_len + step.block_end :] = -torch.inf
    counts = torch.full((x.shape[0],), step.commit, dtype=torch.long)
    return Decision(torch.where(masked, x0, x), confidence, commit_top(confidence, counts))
