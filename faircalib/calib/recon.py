"""Stage II step 3: weighted block reconstruction from the GPTQ solution.

Per linear, starting exactly at the GPTQ solution, learn rounding offsets (a code may move by at most
one step), per-group scale multipliers and, when activations are quantized, a per-layer clip ratio, all
through straight-through rounding, to minimise the token-weighted block-output error
sum_j w_j ||h_fp(j) - h_q(j)||^2 / sum_j w_j. The result is kept only if that loss went down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.calib.linear import QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.quant import ActSpec, fake_quant_activation, round_ste


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

    def current_codes(self) -> torch.Tensor:
        spec = self.start.spec
        return round_ste(self.codes + self.offset.clamp(-1, 1)).clamp(spec.qmin, spec.qmax)

    def weight(self) -> torch.Tensor:
        codes = self.current_codes()
        groups = self.scale.shape[1]
        g = codes.reshape(codes.shape[0], groups, -1)
        if self.zero is not None:
            g = g - self.zero.unsqueeze(-1)
        return (g * (self.scale * self.log_scale.exp()).unsqueeze(-1)).reshape(codes.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = self.act_clip.clamp(0.3, 1.0) if self.act_clip is not None else None
        x = fake_quant_activation(x, self.act, clip=clip, ste=True)
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def export(self, dtype: torch.dtype) -> tuple[QuantizedWeight, ActSpec]:
        """The learned solution as plain codes / scales (and the learned activation clip)."""
        spec = self.start.spec
        with torch.no_grad():
            codes = self.current_codes().to(spec.code_dtype)
            scale = self.scale * self.log_scale.exp()
            act = self.act
            if self.act_clip is not None:
                act = ActSpec(act.bits, act.symmetric, float(self.act_clip.clamp(0.3, 1.0)))
        return QuantizedWeight(codes, scale.float(), self.start.zero, spec), act


@dataclass(frozen=True)
class ReconReport:
    loss_before: float
    loss_after: float
    kept: bool


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j ||output_j - target_j||^2 / sum_j w_j over tokens; output/target [S, L, D], weights [S, L]."""
    per_token = (output.float() - target.float()).pow(2).sum(-1)
    return (per_token * weights).sum() / weights.sum()


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
) -> ReconReport:
    """Tune the QuantLinears ``names`` of ``block`` in place.

    ``run_block(block, hidden, chunk_index)`` runs the block on one chunk's hidden states; ``inputs``,
    ``targets`` and ``weights`` are per chunk ([S, L, D], [S, L, D], [S, L]).
    """
    originals = {name: block.get_submodule(name) for name in names}
    learnables = {}
    for name, layer in originals.items():
        learnables[name] = LearnableQuantLinear(layer.quantized, layer.bias, layer.act).to(layer.weight.device)
        replace_linear(block, name, learnables[name])
    params = [p for layer in learnables.values() for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    # Every state of every chunk, as (chunk, row) pairs, so batches are drawn across lengths.
    rows = [(c, r) for c, chunk in enumerate(inputs) for r in range(chunk.shape[0])]

    def full_loss() -> float:
        with torch.no_grad():
            total = weight_sum = 0.0
            for c, (x, y, w) in enumerate(zip(inputs, targets, weights, strict=True)):
                out = run_block(block, x, c)
                total += float(weighted_mse(out, y, w) * w.sum())
                weight_sum += float(w.sum())
        return total / weight_sum

    before = full_loss()
    for _ in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=generator).tolist()
        loss = 0.0
        for c in sorted({rows[i][0] for i in pick}):
            idx = torch.tensor([rows[i][1] for i in pick if rows[i][0] == c])
            out = run_block(block, inputs[c][idx], c)
            loss = loss + weighted_mse(out, targets[c][idx], weights[c][idx]) * len(idx) / batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = full_loss() if steps else before

    kept = after < before
    for name, learnable in learnables.items():
        original = originals[name]
        if kept:
            weight, act = learnable.export(original.weight.dtype)
            replace_linear(block, name, QuantLinear(weight, original.bias, act, original.weight.dtype))
        else:
            replace_linear(block, name, original)
    return ReconReport(before, after, kept)
