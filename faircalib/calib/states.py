"""Calibration states: the token sequences every block is calibrated on, with a weight per token.

FAIR-Calib and the teacher-state baselines use the teacher's own trajectory states under the
deployment schedule (off-policy: no rollouts of the quantized model). 'gptq-text' uses plain unmasked
text windows, the usual LLM recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from faircalib.calib.config import QuantConfig
from faircalib.calib.probe import ProbeStats, position_prior, probe_statistics, token_weights
from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser
from faircalib.sampling import GenerationResult, Sampling, generate


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


def _by_length(prompts: Sequence[Sequence[int]]) -> dict[int, list[list[int]]]:
    groups: dict[int, list[list[int]]] = {}
    for prompt in prompts:
        groups.setdefault(len(prompt), []).append(list(prompt))
    return groups


def subsample_steps(total: int, keep: int) -> list[int]:
    """``keep`` step indices spread evenly over [0, total), first and last included."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


@torch.no_grad()
def probe_teacher(
    model: Denoiser,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[GenerationResult]:
    """Recorded teacher runs of the deployment schedule, prompts batched by length."""
    runs = []
    for length, group in sorted(_by_length(prompts).items()):
        if length == 0:
            raise ConfigError("calibration prompts must not be empty")
        for start in range(0, len(group), batch_size):
            batch = torch.tensor(group[start : start + batch_size], dtype=torch.long, device=model.device)
            runs.append(generate(model, batch, sampling, model.spec, record=True))
            if on_batch is not None:
                on_batch(batch.shape[0])
    return runs


def teacher_states(
    runs: Sequence[GenerationResult], cfg: QuantConfig, sampling: Sampling, mask_id: int
) -> CalibrationSet:
    """Subsampled teacher states weighted uniformly or by the FAIR-Calib prior."""
    stats = probe_statistics(runs, mask_id)
    prior = position_prior(stats, cfg.lam, getattr(sampling, "block_length", None))
    chunks = []
    for run in runs:
        keep = subsample_steps(len(run.trajectory.steps), cfg.states_per_prompt)
        tokens, weights = [], []
        for index in keep:
            record = run.trajectory.steps[index]
            tokens.append(record.tokens)
            if cfg.weighting == "prior":
                weights.append(
                    token_weights(
                        record,
                        run.prompt_length,
                        prior,
                        mask_id,
                        beta=cfg.beta,
                        w_min=cfg.w_min,
                        w_max=cfg.w_max,
                        fragility=cfg.fragility,
                        tau=cfg.tau,
                    )  # fmt: skip
                )
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
