"""The denoising schedule ("external scheduler"): pure functions from a ``denoise(tokens) -> logits``
callable to decisions, shared by the teacher probe, the runtime and the parity metrics."""

from __future__ import annotations

import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import DreamSampling, LLaDASampling, Sampling, sampling_from_json_dict
from faircalib.sampling.dream import generate_dream, shift_logits
from faircalib.sampling.llada import Denoise, generate_llada
from faircalib.sampling.schedule import Schedule, ScheduleStep, plan
from faircalib.sampling.trajectory import GenerationResult, StepRecord, Trajectory


def default_sampling(spec: DenoiserSpec, **overrides) -> Sampling:
    """The family's reference sampler with its reference defaults, updated by ``overrides``."""
    cls = DreamSampling if spec.sampler == "dream" else LLaDASampling
    return cls(**overrides)


def generate(
    denoise: Denoise,
    prompt: torch.Tensor,
    sampling: Sampling,
    spec: DenoiserSpec,
    *,
    seed: int = 0,
    schedule: Schedule | None = None,
    record: bool = False,
) -> GenerationResult:
    """Run ``sampling`` with ``denoise`` from ``prompt`` ([B, P] or [P] int64).

    ``schedule`` defaults to ``plan(sampling, P)``; pass one read from schedule.json to replay an export.
    The same seed gives the same output.
    """
    if prompt.ndim == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.ndim != 2 or prompt.dtype != torch.long:
        raise ConfigError(f"prompt must be int64 of shape [B, P], got {prompt.dtype} {tuple(prompt.shape)}")
    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= spec.vocab_size):
        raise ConfigError(f"prompt token ids must be in [0, {spec.vocab_size}), got {prompt.min()}..{prompt.max()}")
    if bool((prompt == spec.mask_token_id).any()):
        raise ConfigError(f"the prompt contains the mask token ({spec.mask_token_id})")
    if (spec.sampler == "dream") != isinstance(sampling, DreamSampling):
        raise ConfigError(f"{type(sampling).__name__} does not fit a {spec.family} model ({spec.sampler} sampler)")
    schedule = schedule or plan(sampling, prompt.shape[1])
    if schedule.prompt_length != prompt.shape[1] or schedule.gen_length != sampling.gen_length:
        raise ConfigError(
            f"schedule is for prompt {schedule.prompt_length} + gen {schedule.gen_length}, "
            f"got prompt {prompt.shape[1]} + gen {sampling.gen_length}"
        )
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    if isinstance(sampling, DreamSampling):
        return generate_dream(denoise, prompt, sampling, schedule, spec.mask_token_id, generator, record)
    return generate_llada(
        denoise, prompt, sampling, schedule, spec.mask_token_id, spec.eos_token_ids, generator, record
    )


__all__ = [
    "Denoise",
    "DreamSampling",
    "GenerationResult",
    "LLaDASampling",
    "Sampling",
    "Schedule",
    "ScheduleStep",
    "StepRecord",
    "Trajectory",
    "default_sampling",
    "generate",
    "generate_dream",
    "generate_llada",
    "plan",
    "sampling_from_json_dict",
    "shift_logits",
]
