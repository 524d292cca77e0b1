"""The unmasking driver: execute a bundle's schedule.json against any backend."""

from __future__ import annotations

from pathlib import Path

import torch

from faircalib.exporter.schedule_file import ExportedSchedule, read_schedule
from faircalib.sampling import Denoise, GenerationResult, generate


def run_schedule(
    backend: Denoise, schedule: ExportedSchedule, prompt: torch.Tensor, *, seed: int = 0, record: bool = False
) -> GenerationResult:
    """Decode ``prompt`` ([B, P] or [P]) with ``backend`` exactly as the exported plan says."""
    if prompt.ndim == 1:
        prompt = prompt.unsqueeze(0)
    plan = schedule.for_prompt(prompt.shape[1])
    return generate(backend, prompt, schedule.sampling, schedule.spec, seed=seed, schedule=plan, record=record)


def run_bundle(backend: Denoise, bundle: str | Path, prompt: torch.Tensor, **kwargs) -> GenerationResult:
    return run_schedule(backend, read_schedule(Path(bundle)), prompt, **kwargs)
