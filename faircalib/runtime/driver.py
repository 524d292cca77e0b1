"""The unmasking driver: execute a bundle's schedule.json against any backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from faircalib.exporter.schedule_file import ExportedSchedule, read_schedule
from faircalib.sampling import Denoise, GenerationResult, generate


def run_schedule(
    backend: Denoise,
    schedule: ExportedSchedule,
    prompt: torch.Tensor,
    *,
    seed: int = 0,
    record: bool = False,
    on_step: Callable[[], None] | None = None,
) -> GenerationResult:
    """Decode ``prompt`` ([B, P] or [P]) with ``backend`` exactly as the exported plan says; ``on_step()``
    after every denoiser call."""
    if prompt.ndim == 1:
        prompt = prompt.unsqueeze(0)
    plan = schedule.for_prompt(prompt.shape[1])
    denoise = backend
    if on_step is not None:

        def denoise(tokens: torch.Tensor) -> torch.Tensor:
            logits = backend(tokens)
            on_step()
            return logits

    return generate(denoise, prompt, schedule.sampling, schedule.spec, seed=seed, schedule=plan, record=record)


def run_bundle(backend: Denoise, bundle: str | Path, prompt: torch.Tensor, **kwargs) -> GenerationResult:
    return run_schedule(backend, read_schedule(Path(bundle)), prompt, **kwargs)
