"""The static denoising plan: which block is open and how many tokens each step commits.

This is what "the denoising loop unrolled as an external scheduler" means: the exported graph is one
forward pass and this table is data. The same table drives the PyTorch teacher, the ONNX Runtime and
TensorRT students, so parity compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from faircalib.errors import ConfigError
from faircalib.sampling.config import DreamSampling, LLaDASampling, Sampling

SCHEDULE_FORMAT = 1


@dataclass(frozen=True)
class ScheduleStep:
    """One denoiser call. Block bounds are offsets into the generated region, [block_start, block_end).

    ``commit`` is the number of masked positions to unmask, or None when the count is random
    (Dream's 'origin' algorithm unmasks each position independently).
    """

    block: int
    block_start: int
    block_end: int
    commit: int | None


@dataclass(frozen=True)
class Schedule:
    prompt_length: int
    gen_length: int
    steps: tuple[ScheduleStep, ...]

    def __post_init__(self) -> None:
        known = [s.commit for s in self.steps if s.commit is not None]
        if len(known) == len(self.steps) and sum(known) != self.gen_length:
            raise ConfigError(f"schedule commits {sum(known)} tokens for a gen_length of {self.gen_length}")

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.gen_length

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "prompt_length": self.prompt_length,
            "gen_length": self.gen_length,
            "steps": [asdict(step) for step in self.steps],
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Schedule:
        try:
            steps = tuple(ScheduleStep(**step) for step in data["steps"])
            return cls(prompt_length=int(data["prompt_length"]), gen_length=int(data["gen_length"]), steps=steps)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"malformed schedule: {err}") from None


def llada_transfer_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's ``get_num_transfer_tokens``: ``masked`` spread over ``steps``, the first
    ``masked % steps`` steps taking one more."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def dream_transfer_counts(masked: int, steps: int, eps: float) -> list[int]:
    """Dream's count per step: n_i = int(M_i * (1 - s/t)) over float32 timesteps linspace(1, eps, steps+1),
    with the last step committing everything left. The float32 arithmetic matches the reference."""
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    counts, left = [], masked
    for i in range(steps):
        if i < steps - 1:
            fraction = 1 - timesteps[i + 1] / timesteps[i]
            n = int(torch.tensor(float(left), dtype=torch.float32) * fraction)
        else:
            n = left
        counts.append(n)
        left -= n
    return counts


def plan(sampling: Sampling, prompt_length: int) -> Schedule:
    """The full static schedule of ``sampling`` for a prompt of ``prompt_length`` tokens."""
    if prompt_length < 0:
        raise ConfigError(f"prompt_length must be >= 0, got {prompt_length}")
    steps: list[ScheduleStep] = []
    if isinstance(sampling, LLaDASampling):
        per_block = sampling.steps // sampling.num_blocks
        for block in range(sampling.num_blocks):
            start = block * sampling.block_length
            for count in llada_transfer_counts(sampling.block_length, per_block):
                steps.append(ScheduleStep(block, start, start + sampling.block_length, count))
    elif isinstance(sampling, DreamSampling):
        if sampling.alg == "origin":
            counts: list[int | None] = [None] * sampling.steps
        else:
            counts = list(dream_transfer_counts(sampling.gen_length, sampling.steps, sampling.eps))
        steps = [ScheduleStep(0, 0, sampling.gen_length, count) for count in counts]
    else:
        raise ConfigError(f"not a sampling config: {sampling!r}")
    return Schedule(prompt_length=prompt_length, gen_length=sampling.gen_length, steps=tuple(steps))
