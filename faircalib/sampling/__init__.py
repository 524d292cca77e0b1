"""The denoising schedule ("external scheduler"): pure functions from a ``denoise(tokens) -> logits``
callable to decisions, shared by the teacher probe, the runtime and the parity metrics."""

from __future__ import annotations

from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import DreamSampling, LLaDASampling, Sampling, sampling_from_json_dict
from faircalib.sampling.dream import shift_logits
from faircalib.sampling.llada import Decision, Denoise
from faircalib.sampling.loop import decide, generate, is_deterministic, record_runs, step_logits
from faircalib.sampling.schedule import Schedule, ScheduleStep, plan
from faircalib.sampling.trajectory import GenerationResult, StepRecord, Trajectory


def default_sampling(spec: DenoiserSpec, **overrides) -> Sampling:
    """The family's reference sampler with its reference defaults, updated by ``overrides``."""
    cls = DreamSampling if spec.sampler == "dream" else LLaDASampling
    return cls(**overrides)


__all__ = [
    "Decision",
    "Denoise",
    "DreamSampling",
    "GenerationResult",
    "LLaDASampling",
    "Sampling",
    "Schedule",
    "ScheduleStep",
    "StepRecord",
    "Trajectory",
    "decide",
    "default_sampling",
    "generate",
    "is_deterministic",
    "plan",
    "record_runs",
    "sampling_from_json_dict",
    "shift_logits",
    "step_logits",
]
