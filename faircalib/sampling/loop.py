"""The unmasking loop: execute a Schedule against a ``denoise(tokens) -> logits`` callable.

``step_logits`` and ``decide`` are the two halves of one step, exposed so that the parity metrics can
ask a student for the decision it would make at the teacher's state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import DreamSampling, LLaDASampling, Sampling
from faircalib.sampling.dream import dream_decide, dream_logits
from faircalib.sampling.llada import Decision, Denoise, llada_decide, llada_logits
from faircalib.sampling.schedule import Schedule, ScheduleStep, plan
from faircalib.sampling.shard import gathered, mine
from faircalib.sampling.trajectory import GenerationResult, Trajectory, record_step


def step_logits(
    denoise: Denoise, x: torch.Tensor, prompt_len: int, sampling: Sampling, spec: DenoiserSpec
) -> torch.Tensor:
    """[B, L, V] logits the sampler decides from (after guidance or the logit shift), on ``x``'s device:
    an ONNX Runtime student answers on the CPU while a teacher's recorded states may live on a GPU."""
    if isinstance(sampling, DreamSampling):
        return dream_logits(denoise, x, spec).to(x.device)
    return llada_logits(denoise, x, prompt_len, sampling, spec).to(x.device)


def decide(
    logits: torch.Tensor,
    x: torch.Tensor,
    step_index: int,
    step: ScheduleStep,
    prompt_len: int,
    sampling: Sampling,
    spec: DenoiserSpec,
    generator: torch.Generator | None = None,
) -> Decision:
    if isinstance(sampling, DreamSampling):
        return dream_decide(logits, x, step_index, step, sampling, spec, generator)
    return llada_decide(logits, x, step, prompt_len, sampling, spec, generator)


def is_deterministic(sampling: Sampling) -> bool:
    """Whether decisions depend only on the logits (no sampling noise): what teacher-forced parity needs."""
    if sampling.temperature > 0:
        return False
    if isinstance(sampling, LLaDASampling):
        return sampling.remasking != "random"
    return sampling.alg != "origin" and not sampling.alg_temp


def validate_prompt(prompt: torch.Tensor, sampling: Sampling, spec: DenoiserSpec) -> torch.Tensor:
    """[B, P] or [P] int64 ids inside the vocabulary, free of the mask token, for a matching sampler."""
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
    return prompt


@torch.no_grad()
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
    The same seed gives the same output. ``record`` keeps a Trajectory of every step.
    """
    prompt = validate_prompt(prompt, sampling, spec)
    batch, prompt_len = prompt.shape
    schedule = schedule or plan(sampling, prompt_len)
    if schedule.prompt_length != prompt_len or schedule.gen_length != sampling.gen_length:
        raise ConfigError(
            f"schedule is for prompt {schedule.prompt_length} + gen {schedule.gen_length}, "
            f"got prompt {prompt_len} + gen {sampling.gen_length}"
        )
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    x = torch.full((batch, schedule.total_length), spec.mask_token_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    trajectory = Trajectory.allocate(prompt_len, len(schedule.steps), x.shape, x.device) if record else None
    for index, step in enumerate(schedule.steps):
        logits = step_logits(denoise, x, prompt_len, sampling, spec)
        decision = decide(logits, x, index, step, prompt_len, sampling, spec, generator)
        record_step(trajectory, index, step.block, x, logits, decision)
        x = torch.where(decision.committed, decision.candidates, x)
    return GenerationResult(tokens=x, prompt_length=prompt_len, trajectory=trajectory)


@torch.no_grad()
def record_runs(
    denoise: Denoise,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    spec: DenoiserSpec,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    on_progress: Callable[[float], None] | None = None,
) -> list[tuple[Schedule, GenerationResult]]:
    """Recorded runs of ``sampling`` over ``prompts``, batched by prompt length (each batch shares one schedule):
    the teacher's trajectories that calibration learns from and parity compares against. Under torchrun the
    batches are shared among the processes and every process gets all runs (``sampling.shard``).
    ``on_progress(prompts)`` after every denoising step, with the share of a batch's prompts that step did."""
    by_length: dict[int, list[list[int]]] = {}
    for prompt in prompts:
        if not prompt:
            raise ConfigError("prompts must not be empty")
        by_length.setdefault(len(prompt), []).append(list(prompt))
    batches = [(length, group[start : start + batch_size]) for length, group in sorted(by_length.items())
               for start in range(0, len(group), batch_size)]  # fmt: skip
    runs = []
    for length, rows in mine(batches):  # every batch when not sharded over processes
        schedule = plan(sampling, length)
        batch = torch.tensor(rows, dtype=torch.long, device=device)
        ticker = Ticker(on_progress, batch.shape[0], len(schedule.steps))
        runs.append((schedule, generate(ticker.wrap(denoise), batch, sampling, spec, schedule=schedule, record=True)))
        ticker.finish()
    return gathered(runs)


class Ticker:
    """Progress of one batch of ``share`` prompts over about ``calls`` forwards: each forward of the wrapped
    denoiser reports its part of the batch (never more than the batch in all), and ``finish`` the rest."""

    def __init__(self, on_progress: Callable[[float], None] | None, share: float, calls: int):
        self.on_progress, self.share, self.calls, self.done = on_progress, share, max(calls, 1), 0.0

    def wrap(self, denoise: Denoise) -> Denoise:
        if self.on_progress is None:
            return denoise

        def call(tokens: torch.Tensor) -> torch.Tensor:
            logits = denoise(tokens)
            self._report(min(self.share / self.calls, self.share - self.done))
            return logits

        return call

    def finish(self) -> None:
        self._report(self.share - self.done)

    def _report(self, amount: float) -> None:
        if self.on_progress is not None and amount > 1e-9:  # not a rounding crumb
            self.done += amount
            self.on_progress(amount)
