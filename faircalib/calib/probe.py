"""Stage I of FAIR-Calib: probe the full-precision teacher under the deployment schedule and turn its
trajectories into a position prior, per-token weights, and the calibration states Stage II learns from.

Definitions (docs/DESIGN.md, "Stage I"):
- frontier at step t: the committed set S_t plus the next |S_t| best-scored eligible positions
  (near misses). H(j) = frontier hits of generated position j per probe trajectory.
- masked-stage reliability R(j): over the steps while j was masked, the fraction in which the
  teacher's top-1 at j already equalled the token finally written there. Low R = stability lag.
- prior pi(j) = lam * H(j) / mean(H) + (1 - lam) * (1 - R(j)) / mean(1 - R), pooled by offset within
  the block when decoding is semi-autoregressive (each normalised to mean 1 over the region).
- token weight in a teacher state: w = clip(1 + beta * pi(j) * f, w_min, w_max) on masked generated
  positions, 1 elsewhere, with the fragility f = exp(-|c - c*| / tau): how close the position's confidence
  c is to that step's commit threshold c*.

FAIR-Calib and the teacher-state baselines calibrate on the teacher's own trajectory states under the
deployment schedule (off-policy: no rollouts of the quantized model); 'gptq-text' on plain unmasked text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from faircalib.calib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.sampling import GenerationResult, Sampling, StepRecord


@dataclass(frozen=True)
class ProbeStats:
    """Per generated position (length gen_length)."""

    frontier_hits: torch.Tensor  # H(j): frontier hits per trajectory
    reliability: torch.Tensor  # R(j) in [0, 1]
    trajectories: int


def frontier(record: StepRecord) -> torch.Tensor:
    """[B, L] bool: positions committed at this step plus as many next-best eligible near misses."""
    committed = record.committed
    eligible = torch.isfinite(record.confidence) & ~committed
    near = torch.zeros_like(committed)
    for row in range(committed.shape[0]):
        k = min(int(committed[row].sum()), int(eligible[row].sum()))
        if k:
            scores = record.confidence[row].masked_fill(~eligible[row], -torch.inf)
            near[row, scores.topk(k).indices] = True
    return committed | near


def probe_statistics(runs: Sequence[GenerationResult], mask_id: int) -> ProbeStats:
    """Frontier hits and masked-stage reliability over recorded teacher runs (any prompt lengths)."""
    if not runs:
        raise ConfigError("the probe needs at least one teacher run")
    gen, device = runs[0].generated.shape[1], runs[0].tokens.device
    hits, masked_steps, agreeing = (torch.zeros(gen, dtype=torch.float64, device=device) for _ in range(3))
    rows = 0
    for run in runs:
        if run.trajectory is None:
            raise ConfigError("probe runs must be recorded (generate(..., record=True))")
        if run.generated.shape[1] != gen:
            raise ConfigError(f"probe runs disagree on gen_length ({run.generated.shape[1]} vs {gen})")
        p = run.prompt_length
        final = run.generated
        rows += final.shape[0]
        for record in run.trajectory.steps:
            hits += frontier(record)[:, p:].sum(0).double()
            masked = record.tokens[:, p:] == mask_id
            masked_steps += masked.sum(0).double()
            agreeing += (masked & (record.top1[:, p:] == final)).sum(0).double()
    reliability = torch.where(masked_steps > 0, agreeing / masked_steps.clamp_min(1), torch.ones_like(agreeing))
    return ProbeStats(frontier_hits=hits / rows, reliability=reliability, trajectories=rows)


def _mean_one(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean()
    return values / mean if mean > 0 else torch.ones_like(values)


def position_prior(stats: ProbeStats, lam: float = 0.5, block_length: int | None = None) -> torch.Tensor:
    """pi [gen_length] (mean 1): lam = 1 is frontier-only, lam = 0 reliability-only."""
    if not 0 <= lam <= 1:
        raise ConfigError(f"lam must be in [0, 1], got {lam}")
    hits, instability = stats.frontier_hits, 1 - stats.reliability
    gen = hits.shape[0]
    if block_length is not None and block_length < gen:
        if gen % block_length:
            raise ConfigError(f"gen_length {gen} is not a multiple of block_length {block_length}")
        hits = hits.view(-1, block_length).mean(0).repeat(gen // block_length)
        instability = instability.view(-1, block_length).mean(0).repeat(gen // block_length)
    return (lam * _mean_one(hits) + (1 - lam) * _mean_one(instability)).float()


def commit_threshold(record: StepRecord) -> torch.Tensor:
    """[B, 1]: midway between the weakest committed and the strongest passed-over eligible confidence."""
    finite = torch.isfinite(record.confidence)
    low_in = record.confidence.masked_fill(~(record.committed & finite), torch.inf).amin(1, keepdim=True)
    high_out = record.confidence.masked_fill(~(finite & ~record.committed), -torch.inf).amax(1, keepdim=True)
    low_in = torch.where(torch.isfinite(low_in), low_in, high_out)
    high_out = torch.where(torch.isfinite(high_out), high_out, low_in)
    return (low_in + high_out) / 2


def token_weights(
    record: StepRecord,
    prompt_length: int,
    prior: torch.Tensor,
    mask_id: int,
    *,
    beta: float = 4.0,
    w_min: float = 1.0,
    w_max: float = 8.0,
    tau: float = 0.02,
) -> torch.Tensor:
    """[B, L] weights of one teacher state for the reweighted Hessian / reconstruction loss."""
    gen = record.tokens[:, prompt_length:]
    if gen.shape[1] != prior.shape[0]:
        raise ConfigError(f"prior covers {prior.shape[0]} positions, the state has {gen.shape[1]} generated ones")
    masked = gen == mask_id
    confidence = record.confidence[:, prompt_length:]
    distance = (confidence - commit_threshold(record)).abs()
    f = torch.where(torch.isfinite(confidence), torch.exp(-distance / tau), torch.zeros_like(distance))
    w_gen = (1 + beta * prior.to(f.device) * f).clamp(w_min, w_max)
    weights = torch.ones(record.tokens.shape, dtype=torch.float32, device=record.tokens.device)
    weights[:, prompt_length:] = torch.where(masked, w_gen.float(), torch.ones_like(w_gen).float())
    return weights


@dataclass(frozen=True)
class StateChunk:
    """States sharing one sequence length: tokens [S, L] int64, weights [S, L] float32."""

    tokens: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class CalibrationSet:
    chunks: tuple[StateChunk, ...]
    prior: torch.Tensor | None  # [gen_length], None when not probed
    stats: ProbeStats | None
    description: dict


def subsample_steps(total: int, keep: int) -> list[int]:
    """``keep`` step indices spread evenly over [0, total), first and last included."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def teacher_states(
    runs: Sequence[GenerationResult], cfg: QuantConfig, sampling: Sampling, mask_id: int
) -> CalibrationSet:
    """Subsampled teacher states (``record_runs``'s runs), weighted uniformly or by the FAIR-Calib prior."""
    stats = probe_statistics(runs, mask_id)
    prior = position_prior(stats, cfg.lam, getattr(sampling, "block_length", None))
    chunks = []
    for run in runs:
        tokens, weights = [], []
        for index in subsample_steps(len(run.trajectory.steps), cfg.states_per_prompt):
            record = run.trajectory.steps[index]
            tokens.append(record.tokens)
            if cfg.weighting == "prior":
                weights.append(token_weights(record, run.prompt_length, prior, mask_id, beta=cfg.beta,
                                             w_min=cfg.w_min, w_max=cfg.w_max, tau=cfg.tau))  # fmt: skip
            else:
                weights.append(torch.ones_like(record.tokens, dtype=torch.float32))
        chunks.append(StateChunk(torch.cat(tokens), torch.cat(weights)))
    description = {
        "kind": "teacher trajectory states",
        "prompts": sum(r.tokens.shape[0] for r in runs),
        "states": sum(c.tokens.shape[0] for c in chunks),
        "sampling": sampling.to_json_dict(),
        "weighting": cfg.weighting,
    }
    return CalibrationSet(tuple(chunks), prior, stats, description)


def text_states(windows: torch.Tensor) -> CalibrationSet:
    """Plain unmasked text windows [N, L], uniform weights (the usual LLM calibration)."""
    chunk = StateChunk(windows.long(), torch.ones(windows.shape))
    return CalibrationSet((chunk,), None, None, {"kind": "unmasked text windows", "states": windows.shape[0]})
