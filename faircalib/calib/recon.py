"""Stage II step 3: weighted block reconstruction from the GPTQ solution.

Per linear, starting exactly at the GPTQ solution, learn rounding offsets (a code may move by at most
one step), per-group scale multipliers and, when activations are quantized, a per-layer clip ratio, all
through straight-through rounding, to minimise the token-weighted block-output error
sum_j w_j ||h_fp(j) - h_q(j)||^2 / sum_j w_j. The result is kept only if that loss went down. Adam's step
size decays to zero on a cosine, as the learned rotation's does, so the solution settles instead of ending
wherever the last minibatch pushed it; it was measured together with the rotation's decay, which is the
half that moved decisions (docs/RESULTS.md).

The bounded parameters are projected back into their box after every step rather than clamped in the
forward pass: a clamp passes no gradient outside its range, so a clip ratio that one early minibatch
pushed past 1.0 (where it starts) would stay there for good, whatever later batches say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.calib.linear import QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.quant import ActSpec, fake_quant_activation, round_ste

CLIP_FLOOR = 0.3  # learned activation clip ratios stay in [CLIP_FLOOR, 1]


class LearnableQuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActSpec):
        super().__init__()
        self.start = weight
        self.act = act
        self.register_buffer("codes", weight.codes.float())
        self.register_buffer("scale", weight.scale.float())
        self.register_buffer("zero", weight.zero.float() if weight.zero is not None else None)
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale))
        self.act_clip = nn.Parameter(torch.tensor(act.clip_ratio)) if act.enabled else None

    @torch.no_grad()
    def project_(self) -> None:
        """Back into the feasible box: codes move at most one step, clip ratios stay in [CLIP_FLOOR, 1] (or
        down to where a smaller configured ratio started)."""
        self.offset.clamp_(-1, 1)
        if self.act_clip is not None:
            self.act_clip.clamp_(min(CLIP_FLOOR, self.act.clip_ratio), 1.0)

    def current_codes(self) -> torch.Tensor:
        spec = self.start.spec
        return round_ste(self.codes + self.offset).clamp(spec.qmin, spec.qmax)

    def weight(self) -> torch.Tensor:
        codes = self.current_codes()
        groups = self.scale.shape[1]
        g = codes.reshape(codes.shape[0], groups, -1)
        if self.zero is not None:
            g = g - self.zero.unsqueeze(-1)
        return (g * (self.scale * self.log_scale.exp()).unsqueeze(-1)).reshape(codes.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quant_activation(x, self.act, clip=self.act_clip, ste=True)
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def export(self, dtype: torch.dtype) -> tuple[QuantizedWeight, ActSpec]:
        """The learned solution as plain codes / scales (and the learned activation clip)."""
        spec = self.start.spec
        with torch.no_grad():
            codes = self.current_codes().to(spec.code_dtype)
            scale = self.scale * self.log_scale.exp()
            act = self.act
            if self.act_clip is not None:
                act = replace(act, clip_ratio=self.act_clip.item())
        return QuantizedWeight(codes, scale.float(), self.start.zero, spec), act


FULL_PASS_STATES = 32  # states per forward when the objective is evaluated on the whole calibration set


@dataclass(frozen=True)
class ReconReport:
    loss_before: float  # the combined objective, each term normalised to 1 at the start
    loss_after: float
    kept: bool


@dataclass(frozen=True)
class HeadTerm:
    """The logits-level part of the objective, for the last block: the full-precision head maps both the
    student's and the teacher's final hidden states to logits, compared where decisions are made."""

    head: Callable[[torch.Tensor], torch.Tensor]
    decision_masks: Sequence[torch.Tensor]  # per chunk [S, L] bool: positions whose logits decide a masked token
    weight: float


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j ||output_j - target_j||^2 / sum_j w_j over tokens; output/target [S, L, D], weights [S, L]."""
    per_token = (output.float() - target.float()).pow(2).sum(-1)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def weighted_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j KL(p_teacher(j) || p_student(j)) / sum_j w_j; logits [S, L, V], weights [S, L]."""
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def reconstruct_block(
    block: nn.Module,
    run_block: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    names: Sequence[str],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    head: HeadTerm | None = None,
) -> ReconReport:
    """Tune the QuantLinears ``names`` of ``block`` in place.

    ``run_block(block, hidden, chunk_index)`` runs the block on one chunk's hidden states; ``inputs``,
    ``targets`` and ``weights`` are per chunk ([S, L, D], [S, L, D], [S, L]). The objective is
    mse / mse_0 (+ head.weight * kl / kl_0), each term relative to its value at the GPTQ solution.
    """
    originals = {name: block.get_submodule(name) for name in names}
    learnables = {}
    for name, layer in originals.items():
        learnables[name] = LearnableQuantLinear(layer.quantized, layer.bias, layer.act).to(layer.device)
        replace_linear(block, name, learnables[name])
    params = [p for layer in learnables.values() for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    # Every state of every chunk, as (chunk, row) pairs, so batches are drawn across lengths.
    rows = [(c, r) for c, chunk in enumerate(inputs) for r in range(chunk.shape[0])]

    def terms(c: int, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        out, target, w = run_block(block, inputs[c][idx], c), targets[c][idx], weights[c][idx]
        mse = weighted_mse(out, target, w)
        if head is None:
            return mse, torch.zeros(())
        with torch.no_grad():
            teacher_logits = head.head(target)
        kl = weighted_kl(head.head(out), teacher_logits, w * head.decision_masks[c][idx])
        return mse, kl

    def full_terms() -> tuple[float, float]:
        """Both terms over every state, in slices: the head term's logits are [S, L, vocab]."""
        sums, totals = [0.0, 0.0], [0.0, 0.0]
        with torch.no_grad():
            for c in range(len(inputs)):
                for start in range(0, inputs[c].shape[0], FULL_PASS_STATES):
                    rows = slice(start, start + FULL_PASS_STATES)
                    w = weights[c][rows]
                    mass = (float(w.sum()), float((w * head.decision_masks[c][rows]).sum()) if head else 0.0)
                    for k, value in enumerate(terms(c, rows)):
                        sums[k] += float(value) * mass[k]
                        totals[k] += mass[k]
        return sums[0] / max(totals[0], 1e-12), sums[1] / max(totals[1], 1e-12)

    mse_0, kl_0 = full_terms()
    mse_0, kl_0 = max(mse_0, 1e-12), max(kl_0, 1e-12)

    def objective(mse, kl):
        return mse / mse_0 + (head.weight * kl / kl_0 if head is not None else 0.0)

    before = objective(mse_0, kl_0)
    for _ in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=generator).tolist()
        loss = 0.0
        for c in sorted({rows[i][0] for i in pick}):
            idx = torch.tensor([rows[i][1] for i in pick if rows[i][0] == c])
            loss = loss + objective(*terms(c, idx)) * len(idx) / batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for layer in learnables.values():
            layer.project_()
    after = objective(*full_terms()) if steps else before

    kept = after < before
    for name, learnable in learnables.items():
        original = originals[name]
        if kept:
            weight, act = learnable.export(original.dtype)
            replace_linear(block, name, QuantLinear(weight, original.bias, act, original.dtype))
        else:
            replace_linear(block, name, original)
    return ReconReport(before, after, kept)
