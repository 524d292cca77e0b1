"""Stage II step 3: weighted block reconstruction from the GPTQ solution.

Per linear, starting exactly at the GPTQ solution, learn rounding offsets (a code may move by at most
one step), per-group scale multipliers and, when activations are quantized, a per-layer clip ratio, all
through straight-through rounding, to minimise the token-weighted block-output error
sum_j w_j ||h_fp(j) - h_q(j)||^2 / sum_j w_j. The result is kept only if that loss went down. Adam's step
size decays to zero on a cosine, as the learned rotation's does, so the solution settles instead of ending
wherever the last minibatch pushed it.

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

from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.objectives import adam_cosine, weighted_kl, weighted_mse
from faircalib.calib.quant import fake_quant_activation, round_ste, stored_scale

CLIP_FLOOR = 0.3  # learned activation clip ratios stay in [CLIP_FLOOR, 1]


class LearnableQuantLinear(nn.Module):
    """A QuantLinear's solution made learnable: rounding offsets, scale multipliers and the activation clip."""

    def __init__(self, layer: QuantizedLayer, bias: torch.Tensor | None):
        super().__init__()
        weight, act = layer.weight, layer.act
        self.start = weight
        self.act = act
        self.register_buffer("codes", weight.codes.float())
        self.register_buffer("scale", weight.scale.float())
        self.register_buffer("zero", weight.zero.float() if weight.zero is not None else None)
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale))
        # a clip ratio is learned where the runtime applies one: not for per-block scales (llama.cpp has none)
        learns_clip = act.enabled and act.group_size is None
        self.act_clip = nn.Parameter(torch.tensor(act.clip_ratio)) if learns_clip else None

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

    def export(self) -> QuantizedLayer:
        """The learned solution as plain codes / scales (and the learned activation clip)."""
        spec = self.start.spec
        with torch.no_grad():
            codes = self.current_codes().to(spec.code_dtype)
            scale = stored_scale(spec, self.scale * self.log_scale.exp())
            act = self.act
            if self.act_clip is not None:
                act = replace(act, clip_ratio=self.act_clip.item())
        return QuantizedLayer(QuantizedWeight(codes, scale.float(), self.start.zero, spec), act)


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


@dataclass
class _Objective:
    """mse / mse_0 (+ head.weight * kl / kl_0) of one block, each term relative to its value at the start.

    ``run_block(block, hidden, chunk_index)`` runs the block on one chunk's hidden states; ``inputs``,
    ``targets`` and ``weights`` are per chunk ([S, L, D], [S, L, D], [S, L])."""

    block: nn.Module
    run_block: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
    inputs: Sequence[torch.Tensor]
    targets: Sequence[torch.Tensor]
    weights: Sequence[torch.Tensor]
    head: HeadTerm | None
    scale: tuple[float, float] = (1.0, 1.0)

    def terms(self, c: int, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted block-output mse, weighted head KL) on rows ``idx`` of chunk ``c``."""
        out, target, w = self.run_block(self.block, self.inputs[c][idx], c), self.targets[c][idx], self.weights[c][idx]
        mse = weighted_mse(out, target, w)
        if self.head is None:
            return mse, torch.zeros(())
        with torch.no_grad():
            teacher_logits = self.head.head(target)
        return mse, weighted_kl(self.head.head(out), teacher_logits, w * self.head.decision_masks[c][idx])

    def value(self, mse, kl):
        return mse / self.scale[0] + (self.head.weight * kl / self.scale[1] if self.head is not None else 0.0)

    @torch.no_grad()
    def full_terms(self) -> tuple[float, float]:
        """Both terms over every state, in slices: the head term's logits are [S, L, vocab]."""
        sums, totals = [0.0, 0.0], [0.0, 0.0]
        for c in range(len(self.inputs)):
            for start in range(0, self.inputs[c].shape[0], FULL_PASS_STATES):
                rows = slice(start, start + FULL_PASS_STATES)
                w = self.weights[c][rows]
                mass = (float(w.sum()), float((w * self.head.decision_masks[c][rows]).sum()) if self.head else 0.0)
                for k, value in enumerate(self.terms(c, rows)):
                    sums[k] += float(value) * mass[k]
                    totals[k] += mass[k]
        return sums[0] / max(totals[0], 1e-12), sums[1] / max(totals[1], 1e-12)

    def minibatch(self, rows: list[tuple[int, int]], pick: list[int]) -> torch.Tensor:
        """The objective on the (chunk, row) pairs ``pick`` indexes, drawn across chunks."""
        loss = 0.0
        for c in sorted({rows[i][0] for i in pick}):
            idx = torch.tensor([rows[i][1] for i in pick if rows[i][0] == c])
            loss = loss + self.value(*self.terms(c, idx)) * len(idx) / len(pick)
        return loss


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
    """Tune the QuantLinears ``names`` of ``block`` in place (see ``_Objective`` for the arguments); keep the
    result only if the objective over every state went down."""
    originals = {name: block.get_submodule(name) for name in names}
    learnables = {}
    for name, layer in originals.items():
        learnables[name] = LearnableQuantLinear(layer.layer, layer.bias).to(layer.device)
        replace_linear(block, name, learnables[name])
    optimizer, schedule = adam_cosine([p for layer in learnables.values() for p in layer.parameters()], lr, steps)
    generator = torch.Generator().manual_seed(seed)
    rows = [(c, r) for c, chunk in enumerate(inputs) for r in range(chunk.shape[0])]  # batches cross lengths
    objective = _Objective(block, run_block, inputs, targets, weights, head)
    objective.scale = tuple(max(term, 1e-12) for term in objective.full_terms())
    before = objective.value(*objective.scale)
    for _ in range(steps):
        loss = objective.minibatch(rows, torch.randint(len(rows), (batch,), generator=generator).tolist())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for layer in learnables.values():
            layer.project_()
    after = objective.value(*objective.full_terms()) if steps else before
    kept = after < before
    for name, learnable in learnables.items():
        original = originals[name]
        solution = QuantLinear(learnable.export(), original.bias, original.dtype) if kept else original
        replace_linear(block, name, solution)
    return ReconReport(before, after, kept)
