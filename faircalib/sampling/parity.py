"""Parity of a student against its full-precision teacher: the teacher's recorded runs replayed for any
student (a fake-quant model, an ONNX Runtime or TensorRT backend), pooled into the reported rates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import Sampling
from faircalib.sampling.llada import Denoise
from faircalib.sampling.loop import Ticker, decide, generate, is_deterministic, record_runs, step_logits
from faircalib.sampling.metrics import ParityTally, masked_nll, post_commit_counts, rate
from faircalib.sampling.schedule import Schedule
from faircalib.sampling.shard import gathered, mine
from faircalib.sampling.trajectory import GenerationResult

Runs = list[tuple[Schedule, GenerationResult]]  # what ``record_runs`` returns


@torch.no_grad()
def teacher_post_commit_mismatch(
    teacher: Denoise,
    references: Runs,
    sampling: Sampling,
    spec: DenoiserSpec,
    probes: int = 1,
) -> float:
    """``post_commit_mismatch`` of the teacher in its own recorded runs: where a student that decided
    exactly like it would land on both post-commit metrics. A student below it on the free-running one is
    not more faithful, only steadier about its own choices than the teacher is about its own.
    """
    pairs, mismatches = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
    for _, reference in references:
        counts = post_commit_counts(teacher, reference, sampling, spec, probes=probes)
        pairs += counts["settled_pairs"].sum()
        mismatches += counts["post_commit_mismatches"].sum()
    return rate(mismatches, pairs)


@torch.no_grad()
def evaluate_parity(
    student: Denoise,
    references: Runs,
    sampling: Sampling,
    spec: DenoiserSpec,
    on_progress: Callable[[float], None] | None = None,
    post_commit_probes: int = 1,
    judge: Callable[[list[int], list[int]], bool] | None = None,
) -> ParityTally:
    """The student's recorded rollout of every reference batch, teacher-forced and free-running counts
    pooled into one tally; ``on_progress(prompts)`` as the work on each batch goes on; ``judge(prompt ids,
    generated ids)`` verifies answers, where the prompts carry a verifier. Under torchrun the batches are shared
    among the processes and every process gets the whole tally."""
    batches = []
    for schedule, reference in mine(references):  # every batch when not sharded over processes
        prompt = reference.tokens[:, : reference.prompt_length]
        # a rollout, the teacher-forced pass and two post-commit passes of up to ``probes`` forwards a step
        ticker = Ticker(on_progress, prompt.shape[0], len(schedule.steps) * (2 + 2 * post_commit_probes))
        counted, batch = ticker.wrap(student), ParityTally(judge=judge)
        rollout = generate(counted, prompt, sampling, spec, schedule=schedule, record=True)
        batch.add(counted, reference, rollout, sampling, spec, schedule, post_commit_probes)
        batches.append(replace(batch, judge=None))  # a judge does not travel between processes
        ticker.finish()
    tally = ParityTally(judge=judge)
    for batch in gathered(batches):  # pooled in batch order: the same sums in any number of processes
        tally.merge(batch)
    return tally


@torch.no_grad()
def decision_agreement(
    student_a: Denoise,
    student_b: Denoise,
    references: Runs,
    sampling: Sampling,
    spec: DenoiserSpec,
) -> dict[str, float | int]:
    """How often two students make the same committed decision at the teacher's states: the fraction of
    A's commits that B also commits at that step with the same token (and the token-only agreement)."""
    if not is_deterministic(sampling):
        raise ConfigError("decision agreement needs a deterministic schedule (temperature 0, no random remasking)")
    commits = same_decisions = same_tokens = 0
    for schedule, reference in references:
        for index, record in enumerate(reference.trajectory.steps):
            step = schedule.steps[index]
            a = decide(step_logits(student_a, record.tokens, reference.prompt_length, sampling, spec),
                       record.tokens, index, step, reference.prompt_length, sampling, spec)  # fmt: skip
            b = decide(step_logits(student_b, record.tokens, reference.prompt_length, sampling, spec),
                       record.tokens, index, step, reference.prompt_length, sampling, spec)  # fmt: skip
            commits += int(a.committed.sum())
            same_decisions += int((a.committed & b.committed & (a.candidates == b.candidates)).sum())
            same_tokens += int((a.committed & (a.candidates == b.candidates)).sum())
    return {
        "committed_decisions": commits,
        "decision_agreement": same_decisions / commits if commits else float("nan"),
        "token_agreement": same_tokens / commits if commits else float("nan"),
    }


@torch.no_grad()
def parity_report(
    teacher: Denoise,
    student: Denoise,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    spec: DenoiserSpec,
    *,
    references: Runs | None = None,
    nll_windows: torch.Tensor | None = None,
    nll_fp: float | None = None,
    teacher_post_commit: float | None = None,
    post_commit_probes: int = 4,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    on_progress: Callable[[float], None] | None = None,
    judge: Callable[[list[int], list[int]], bool] | None = None,
) -> dict:
    """Every parity metric (docs/DESIGN.md, "Metrics") of ``student`` against ``teacher`` on ``prompts``.

    ``references`` (from ``record_runs``), ``nll_fp`` and ``teacher_post_commit`` skip recomputing the
    teacher's side when many students are compared with one teacher. ``post_commit_mismatch_teacher`` is
    the teacher's own level of both post-commit metrics, the one a faithful student lands at.
    ``post_commit_probes`` trades time for noise in all three (see ``post_commit_counts``).
    """
    if references is None:
        references = record_runs(teacher, prompts, sampling, spec, batch_size=batch_size, device=device)
    tally = evaluate_parity(student, references, sampling, spec, on_progress, post_commit_probes, judge)
    report = tally.summary()
    if teacher_post_commit is None:
        teacher_post_commit = teacher_post_commit_mismatch(teacher, references, sampling, spec, post_commit_probes)
    report["post_commit_mismatch_teacher"] = teacher_post_commit
    # the criterion on post-commit behaviour: land where the teacher does, neither above nor below
    report["post_commit_forced_distance"] = abs(report["post_commit_mismatch_forced"] - teacher_post_commit)
    if nll_windows is not None:
        windows = nll_windows.to(device)
        report["masked_nll_fp"] = nll_fp if nll_fp is not None else masked_nll(teacher, windows, spec)
        report["masked_nll_q"] = masked_nll(student, windows, spec)
    report["sampling"] = sampling.to_json_dict()
    return report


@dataclass(frozen=True)
class GateRule:
    metric: str
    bound: str  # "<=" or ">="
    value: float

    def failure(self, report: dict) -> str | None:
        """None when ``report`` keeps to the rule, else one line saying by how much it misses."""
        got = report.get(self.metric)
        if not isinstance(got, (int, float)) or got != got:  # absent, or NaN
            return f"{self.metric} is not in the report"
        if (got <= self.value) if self.bound == "<=" else (got >= self.value):
            return None
        return f"{self.metric} {got:.4f} is not {self.bound} {self.value:g} (off by {abs(got - self.value):.4f})"


def parse_gate(spec: str) -> list[GateRule]:
    """``"frontier_flip_rate<=0.03,task_accuracy>=0.8"`` -> its rules; a malformed rule is a ConfigError."""
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        bound = "<=" if "<=" in part else ">=" if ">=" in part else None
        name, _, value = part.partition(bound) if bound else (part, "", "")
        try:
            rules.append(GateRule(name.strip(), bound, float(value)))
        except (TypeError, ValueError):
            raise ConfigError(f"a gate rule is METRIC<=VALUE or METRIC>=VALUE; got {part}") from None
    if not rules:
        raise ConfigError("the gate has no rules")
    return rules


def check_gate(report: dict, spec: str) -> list[str]:
    """The failures of ``report`` against the gate ``spec``, one line each (empty: it passes)."""
    return [line for rule in parse_gate(spec) if (line := rule.failure(report)) is not None]
