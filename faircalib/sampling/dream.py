"""Dream's sampler (Ye et al., "Dream 7B", 2025; Dream's generation_utils.py ``_sample``).

One block over the whole generated region. Logits are shifted right by one (Dream predicts token i
from hidden state i-1). 'origin' unmasks each masked position independently with probability
1 - s/t; the confidence algorithms commit the n best masked positions by the token probability
('maskgit_plus'), the top-1 minus top-2 margin ('topk_margin') or the negative entropy ('entropy').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import DreamSampling
from faircalib.sampling.llada import Decision, Denoise, commit_top
from faircalib.sampling.schedule import ScheduleStep


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Position j takes the prediction made at j - 1; position 0 keeps its own."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_logits(denoise: Denoise, x: torch.Tensor, spec: DenoiserSpec) -> torch.Tensor:
    logits = denoise(x)
    return shift_logits(logits) if spec.logit_shift else logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (the first is always kept)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor, sampling: DreamSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] logits of masked positions -> (confidence [N], token [N]) as the reference computes them."""
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = top_p_filter(logits, sampling.top_p)
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    probs = logits.softmax(dim=-1)
    if sampling.temperature > 0:
        tokens = torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if sampling.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif sampling.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return confidence, tokens


def dream_decide(
    logits: torch.Tensor,
    x: torch.Tensor,
    step_index: int,
    step: ScheduleStep,
    sampling: DreamSampling,
    spec: DenoiserSpec,
    generator: torch.Generator | None,
) -> Decision:
    mask_id = spec.mask_token_id
    masked = x == mask_id
    mask_logits = logits[masked]
    candidates = torch.full_like(x, mask_id)
    confidence = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)

    if sampling.alg == "origin":
        if step_index < sampling.steps - 1:
            timesteps = torch.linspace(1, sampling.eps, sampling.steps + 1, device=x.device)
            p_transfer = 1 - timesteps[step_index + 1] / timesteps[step_index]
        else:
            p_transfer = 1.0
        chosen = torch.rand(mask_logits.shape[0], generator=generator, device=x.device) < p_transfer
        picked = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
        if chosen.any():
            _, picked[chosen] = sample_tokens(mask_logits[chosen], sampling, generator)
        candidates[masked] = picked
        return Decision(torch.where(masked, candidates, x), confidence, masked & (candidates != mask_id))

    scores, tokens = sample_tokens(mask_logits, sampling, generator)
    candidates[masked] = tokens
    confidence[masked] = scores.to(confidence.dtype)
    committed = torch.zeros_like(masked)
    if step.commit:
        if not sampling.alg_temp:
            committed = commit_top(confidence, torch.full((x.shape[0],), step.commit))
        else:
            weights = F.softmax(confidence / sampling.alg_temp, dim=-1)
            rows = torch.multinomial(weights.float(), step.commit, generator=generator)
            committed.scatter_(1, rows, True)
    return Decision(torch.where(masked, candidates, x), confidence, committed)
