"""Decision parity between a full-precision teacher and a student: the counts behind every rate
(definitions: docs/DESIGN.md, "Metrics").

Teacher-forced metrics replay the teacher's trajectory: at every teacher state the student makes the
decision the sampler would make (same schedule step, same block) and is compared with the teacher's.
Free-running metrics compare the student's own rollout with the teacher's.

Post-commit mismatch asks whether a model still writes what was committed, with that position masked
again. ``post_commit_mismatch`` asks the student about its own rollout, so it mixes the text a student
wrote with how firmly it stands by its own choices; ``post_commit_mismatch_forced`` asks every student the
teacher's questions (the teacher's commits at the teacher's states, probed where the teacher's own level
is), and the teacher scores exactly that level.

Counts are kept per step index and summed over prompts, so any number of batches can be pooled
before rates are taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling.config import Sampling
from faircalib.sampling.dream import shift_logits
from faircalib.sampling.llada import Denoise
from faircalib.sampling.loop import decide, is_deterministic, step_logits
from faircalib.sampling.schedule import Schedule
from faircalib.sampling.trajectory import GenerationResult

TEACHER_FORCED = ("teacher_commits", "flips", "set_misses", "student_commits", "write_errors", "margin_error")
# The teacher's commit leads (top-1 minus runner-up logit, nats) are counted in these bins; the last is open.
LEAD_BINS = torch.linspace(0.0, 12.0, 49)
# The rates ``ParityTally.summary`` reports, in the order reports print them.
PARITY_METRICS = (
    "frontier_flip_rate",
    "commit_set_disagreement",
    "frontier_write_error",
    "decision_margin_error",
    "post_commit_mismatch",
    "post_commit_mismatch_forced",
    "teacher_divergence",
    "exact_match",
)


def gap_moved(logits: torch.Tensor, best: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """|l[b1] - l[b2] - gap|: how far logits [..., V] move the gap between the teacher's two best tokens
    best [..., 2] from the teacher's own gap [...] (the decision margin error per position)."""
    pair = logits.gather(-1, best).float()  # cast 2 logits, not [V]
    return (pair[..., 0] - pair[..., 1] - gap).abs()


@torch.no_grad()
def teacher_forced_counts(
    student: Denoise, teacher: GenerationResult, sampling: Sampling, spec: DenoiserSpec, schedule: Schedule
) -> dict[str, torch.Tensor]:
    """Per-step counts [steps] (int64) along the teacher's recorded trajectory:

    - ``teacher_commits``: positions the teacher commits at that step;
    - ``flips``: of those, where the student's token differs from the teacher's (frontier flips);
    - ``set_misses``: of those, positions the student would not commit at that step (commit order);
    - ``student_commits`` / ``write_errors``: positions the student would commit, and of those the ones
      whose token differs from the teacher's final token there (flips that change what is written);
    - ``margin_error`` (float64, nats): summed over the teacher's commits, how far the student moved the
      logit gap between the teacher's two best tokens there. Most flips are this gap changing sign, and
      the sum sees every commit moving towards one, not only the few that cross: a measure of decision
      fidelity with far less sampling noise than the flip count.

    Beside them, where decisions break: ``commits_at`` / ``flips_at`` [gen_length] by generated position,
    and ``lead_commits`` / ``lead_flips`` [len(LEAD_BINS)], the teacher's commits and flips by its lead.
    """
    if teacher.trajectory is None:
        raise ConfigError("teacher-forced parity needs the teacher's trajectory (generate(..., record=True))")
    if not is_deterministic(sampling):
        raise ConfigError("teacher-forced parity needs a deterministic schedule (temperature 0, no random remasking)")
    counts = {name: torch.zeros(len(schedule.steps), dtype=torch.long) for name in TEACHER_FORCED}
    counts["margin_error"] = counts["margin_error"].double()
    start = teacher.prompt_length
    for name, size in (("commits_at", teacher.tokens.shape[1] - start), ("flips_at", teacher.tokens.shape[1] - start),
                       ("lead_commits", len(LEAD_BINS)), ("lead_flips", len(LEAD_BINS))):  # fmt: skip
        counts[name] = torch.zeros(size, dtype=torch.long)
    flips_kept = torch.zeros((len(teacher.trajectory.steps), *teacher.tokens.shape), dtype=torch.bool,
                             device=teacher.tokens.device)  # fmt: skip
    for index, record in enumerate(teacher.trajectory.steps):
        x = record.tokens
        logits = step_logits(student, x, teacher.prompt_length, sampling, spec)
        mine = decide(logits, x, index, schedule.steps[index], teacher.prompt_length, sampling, spec)
        theirs = record.committed
        flipped = theirs & (mine.candidates != record.committed_tokens)
        counts["teacher_commits"][index] = int(theirs.sum())
        counts["flips"][index] = int(flipped.sum())
        flips_kept[index] = flipped
        counts["set_misses"][index] = int((theirs & ~mine.committed).sum())
        counts["student_commits"][index] = int(mine.committed.sum())
        counts["write_errors"][index] = int((mine.committed & (mine.candidates != teacher.tokens)).sum())
        moved = gap_moved(logits, torch.stack((record.top1, record.top2), -1), record.logit_gap)
        counts["margin_error"][index] = float(moved[theirs].double().sum())
    # where they broke, counted once per batch: small tensors made every step pin the freed heap between them
    theirs_all = teacher.trajectory.stacked("committed").cpu()
    flips_all = flips_kept.cpu()
    counts["commits_at"] += theirs_all[:, :, start:].sum((0, 1))
    counts["flips_at"] += flips_all[:, :, start:].sum((0, 1))
    gaps = teacher.trajectory.stacked("logit_gap").float().cpu()
    bins = torch.bucketize(gaps, LEAD_BINS, right=True).clamp(1, len(LEAD_BINS)) - 1
    counts["lead_commits"] += torch.bincount(bins[theirs_all], minlength=len(LEAD_BINS))
    counts["lead_flips"] += torch.bincount(bins[flips_all], minlength=len(LEAD_BINS))
    return counts


@torch.no_grad()
def post_commit_counts(
    model: Denoise,
    rollout: GenerationResult,
    sampling: Sampling,
    spec: DenoiserSpec,
    seed: int = 0,
    probes: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-step counts over (committed generated position, later step) pairs of a rollout: how many pairs
    (int64), and how many of them the model would no longer commit to the same token (float64: an estimate).

    "Would" means with that position masked again: a masked diffusion LM is trained only on masked
    positions, so its output at a visible one says nothing (a full-precision LLaDA often "disagrees"
    there). Leave-one-out for every pair costs a forward each, so every step masks
    ``probes`` random committed positions per row (all of them where the row has fewer), one probe per
    extra sequence, and weights each answer by the row's committed positions over its probes: an unbiased
    estimate of the pair count, exact once ``probes`` reaches the generated length; more probes, less noise.
    """
    if rollout.trajectory is None:
        raise ConfigError("post-commit mismatch needs the rollout's trajectory (generate(..., record=True))")
    if probes < 1:
        raise ConfigError(f"post-commit probes must be >= 1, got {probes}")
    steps = rollout.trajectory.steps
    counts = {
        "settled_pairs": torch.zeros(len(steps), dtype=torch.long),
        "post_commit_mismatches": torch.zeros(len(steps), dtype=torch.float64),
    }
    generator = torch.Generator().manual_seed(seed)
    for index, record in enumerate(steps):
        settled = record.tokens != spec.mask_token_id
        settled[:, : rollout.prompt_length] = False
        per_row = settled.sum(1)
        if int(per_row.sum()) == 0:
            continue
        # Random keys, drawn on the CPU so a model on a GPU probes the same positions; unsettled ones last.
        keys = torch.rand(settled.shape, generator=generator).masked_fill(~settled.cpu(), -1.0)
        picked = keys.topk(min(probes, int(per_row.max())), dim=1)
        rows, slots = (picked.values >= 0).nonzero(as_tuple=True)
        device = settled.device
        rows, cols = rows.to(device), picked.indices[rows, slots].to(device)
        probe = record.tokens[rows].clone()
        probe[torch.arange(rows.numel(), device=device), cols] = spec.mask_token_id
        changed = torch.empty(rows.numel(), dtype=torch.bool, device=device)
        for part in torch.arange(rows.numel(), device=device).split(settled.shape[0]):  # the rollout's batch size
            logits = step_logits(model, probe[part], rollout.prompt_length, sampling, spec)
            answer = logits[torch.arange(part.numel(), device=device), cols[part]].argmax(-1)
            changed[part] = answer != record.tokens[rows[part], cols[part]]
        weight = per_row[rows].double() / torch.bincount(rows, minlength=settled.shape[0])[rows].double()
        counts["settled_pairs"][index] = int(per_row.sum())
        counts["post_commit_mismatches"][index] = float((weight * changed).sum())
    return counts


def rate(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    total = int(denominator.sum())
    return float(numerator.sum()) / total if total else float("nan")


def _curve(numerator: torch.Tensor, denominator: torch.Tensor) -> list[float | None]:
    return [float(n) / int(d) if int(d) else None for n, d in zip(numerator, denominator, strict=True)]


@dataclass
class ParityTally:
    """Pools counts over batches of prompts; ``summary`` turns them into the reported rates."""

    forced: dict[str, torch.Tensor] = field(default_factory=dict)
    free: dict[str, torch.Tensor] = field(default_factory=dict)
    forced_post_commit: dict[str, torch.Tensor] = field(default_factory=dict)
    generated_tokens: int = 0
    differing_tokens: int = 0
    prompts: int = 0
    exact_prompts: int = 0
    # (prompt ids, generated ids) -> whether the answer is right, for prompts that carry a verifier
    judge: Callable[[list[int], list[int]], bool] | None = None
    solved: int = 0
    solved_teacher: int = 0

    @staticmethod
    def _add(into: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> None:
        for name, value in counts.items():
            into[name] = into[name] + value if name in into else value.clone()

    def add(
        self,
        student: Denoise,
        teacher: GenerationResult,
        rollout: GenerationResult,
        sampling: Sampling,
        spec: DenoiserSpec,
        schedule: Schedule,
        post_commit_probes: int = 1,
    ) -> None:
        """One batch: the teacher's recorded run, and the student's own recorded rollout of the same prompts."""
        if teacher.tokens.shape != rollout.tokens.shape:
            raise ConfigError(f"teacher {tuple(teacher.tokens.shape)} and student {tuple(rollout.tokens.shape)} differ")
        self._add(self.forced, teacher_forced_counts(student, teacher, sampling, spec, schedule))
        self._add(self.free, post_commit_counts(student, rollout, sampling, spec, probes=post_commit_probes))
        # The teacher's states and committed tokens, probed where the teacher's own level is probed: every
        # student answers the same questions, so what it wrote and its bias towards its own choices drop out.
        forced = post_commit_counts(student, teacher, sampling, spec, probes=post_commit_probes)
        self._add(self.forced_post_commit, forced)
        differs = teacher.generated != rollout.generated
        self.generated_tokens += differs.numel()
        self.differing_tokens += int(differs.sum())
        self.prompts += differs.shape[0]
        self.exact_prompts += int((~differs.any(dim=1)).sum())
        if self.judge is not None:
            prompts = teacher.tokens[:, : teacher.prompt_length].tolist()
            self.solved += sum(map(self.judge, prompts, rollout.generated.tolist()))
            self.solved_teacher += sum(map(self.judge, prompts, teacher.generated.tolist()))

    def merge(self, other: ParityTally) -> None:
        """Pool another tally's counts into this one."""
        for into, counts in ((self.forced, other.forced), (self.free, other.free),
                             (self.forced_post_commit, other.forced_post_commit)):  # fmt: skip
            self._add(into, counts)
        for name in ("generated_tokens", "differing_tokens", "prompts", "exact_prompts", "solved", "solved_teacher"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, object]:
        f, r, s = self.forced, self.free, self.forced_post_commit
        task = {}
        if self.judge is not None and self.prompts:
            task = {
                "task_accuracy": self.solved / self.prompts,
                "task_accuracy_teacher": self.solved_teacher / self.prompts,
            }
        return {
            **task,
            "frontier_flip_rate": rate(f["flips"], f["teacher_commits"]),
            "commit_set_disagreement": rate(f["set_misses"], f["teacher_commits"]),
            "frontier_write_error": rate(f["write_errors"], f["student_commits"]),
            "decision_margin_error": rate(f["margin_error"], f["teacher_commits"]),
            "post_commit_mismatch": rate(r["post_commit_mismatches"], r["settled_pairs"]),
            "post_commit_mismatch_forced": rate(s["post_commit_mismatches"], s["settled_pairs"]),
            "teacher_divergence": self.differing_tokens / self.generated_tokens if self.generated_tokens else None,
            "exact_match": self.exact_prompts / self.prompts if self.prompts else None,
            "prompts": self.prompts,
            "teacher_commits": int(f["teacher_commits"].sum()),
            "curves": {
                "frontier_flip_rate": _curve(f["flips"], f["teacher_commits"]),
                "commit_set_disagreement": _curve(f["set_misses"], f["teacher_commits"]),
                "frontier_write_error": _curve(f["write_errors"], f["student_commits"]),
                "post_commit_mismatch": _curve(r["post_commit_mismatches"], r["settled_pairs"]),
                "post_commit_mismatch_forced": _curve(s["post_commit_mismatches"], s["settled_pairs"]),
            },
            # where decisions break: by generated position, and by how far the teacher's choice led
            "breakdown": {
                "commits_at": f["commits_at"].tolist(),
                "flips_at": f["flips_at"].tolist(),
                "lead_bins": LEAD_BINS.tolist(),
                "lead_commits": f["lead_commits"].tolist(),
                "lead_flips": f["lead_flips"].tolist(),
            },
        }


@torch.no_grad()
def masked_nll(denoise: Denoise, windows: torch.Tensor, spec: DenoiserSpec, seed: int = 0, eps: float = 1e-3) -> float:
    """LLaDA's masked-diffusion bound on held-out windows [N, L]: per window t ~ U(eps, 1), each token
    masked with probability t, loss = sum over masked tokens of NLL / t, averaged per token."""
    generator = torch.Generator().manual_seed(seed)
    total, tokens = 0.0, 0
    for chunk in windows.split(32):
        # drawn on the CPU, so a model on a GPU sees the same masks
        t = eps + (1 - eps) * torch.rand(chunk.shape[0], 1, generator=generator)
        masked = torch.rand(chunk.shape, generator=generator) < t
        t, masked = t.to(chunk.device), masked.to(chunk.device)
        logits = denoise(torch.where(masked, spec.mask_token_id, chunk)).to(chunk.device)
        if spec.logit_shift:
            logits = shift_logits(logits)
        nll = F.cross_entropy(logits.float().transpose(1, 2), chunk, reduction="none")
        total += float((nll * masked / t).sum())
        tokens += chunk.numel()
    return total / tokens
