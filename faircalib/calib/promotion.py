"""Mixed precision: which quantized linears to keep at 8 bits within a size budget (docs/DESIGN.md, "Promotion").

Two ways to score a linear, both on the turned model before its blocks are calibrated:

- ``flips`` (flip-aware): on a low-bit student of the turned model (every linear rounded to nearest at the
  calibration's format), how much promoting that linear alone shrinks the student's margin error: summed over
  the masked positions of the calibration states (the decisions still to be made, what each becomes and, by
  the confidences, in which order), how far the student moves the logit gap between the teacher's two best
  tokens there. A flip is that gap changing sign; the sum sees every decision moving towards one, a flip count
  only the few that cross. Measured, not estimated: one forward from the linear's block onward per linear.
- ``hessian`` (HAWQ's generic criterion): the trace of the teacher loss's Hessian in the weight (its
  empirical Fisher, one sequence at a time) per weight, times the squared error of rounding the weight.

The budget then goes to the best score per promoted byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from faircalib.calib.config import QuantConfig
from faircalib.calib.linear import QuantizedLayer, QuantLinear, replace_linear
from faircalib.calib.objectives import decision_masks
from faircalib.calib.quant import ActSpec, WeightSpec
from faircalib.calib.rtn import rtn_weight
from faircalib.calib.student import layer_key, linear_names, split_layer_key
from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser
from faircalib.models.streaming import is_streamed
from faircalib.sampling.metrics import gap_moved

PROMOTED_BITS = 8
ROWS = 8  # states per forward while scoring


def promoted_specs(weight: WeightSpec, act: ActSpec) -> tuple[WeightSpec, ActSpec]:
    """A promoted linear's formats: 8-bit weights on the same grid, inputs at 8 bits unless already wider."""
    act_bits = act.bits if not act.enabled else max(act.bits, PROMOTED_BITS)
    return replace(weight, bits=PROMOTED_BITS), replace(act, bits=act_bits)


def margin_error(logits: torch.Tensor, best: torch.Tensor, gap: torch.Tensor) -> float:
    """sum_t |l_t[b1] - l_t[b2] - gap_t|: how far logits [N, V] move the gap between the teacher's two best
    tokens best [N, 2] from the teacher's own gap [N] (parity's ``decision_margin_error``, summed)."""
    return float(gap_moved(logits, best, gap).sum())


def choose_promoted(scores: dict[str, float], sizes: dict[str, int], budget: float, bits: int) -> list[str]:
    """The linears to promote: by score per promoted bit, greedily, while their extra bits fit ``budget`` percent
    of the all-``bits`` size of every scored linear (``sizes``: weights per linear). Only positive scores."""
    allowance = budget / 100 * bits * sum(sizes.values())
    cost = {key: (PROMOTED_BITS - bits) * sizes[key] for key in scores}
    chosen = []
    for key in sorted(scores, key=lambda k: scores[k] / cost[k], reverse=True):
        if scores[key] > 0 and cost[key] <= allowance:
            chosen.append(key)
            allowance -= cost[key]
    return chosen


@dataclass(frozen=True)
class Promotion:
    """What the budget bought: each linear's score, the promoted linears, and the time scoring took."""

    by: str
    budget: float
    scores: dict[str, float]
    promoted: tuple[str, ...]
    seconds: float

    def to_json_dict(self) -> dict:
        return {"by": self.by, "budget": self.budget, "promoted": list(self.promoted),
                "seconds": round(self.seconds, 3), "scores": self.scores}  # fmt: skip

    @classmethod
    def from_json_dict(cls, data: dict) -> Promotion:
        return cls(data["by"], data["budget"], data["scores"], tuple(data["promoted"]), data["seconds"])


def promote(model: Denoiser, tokens: Sequence[torch.Tensor], cfg: QuantConfig) -> Promotion:
    """Score every linear of ``model`` (turned, not yet quantized) on ``cfg.promote_states`` of the calibration
    states (tokens [S, L] per chunk), then spend ``cfg.promote_budget`` on them."""
    if cfg.promote_by == "hessian" and is_streamed(model):
        raise ConfigError("promote_by hessian takes gradients in every weight: it needs the blocks on the device "
                          "(drop --stream-blocks or promote by flips)")  # fmt: skip
    start = time.perf_counter()
    rows = pick_rows(tokens, cfg.promote_states)
    scores = (flip_scores if cfg.promote_by == "flips" else hessian_scores)(model, rows, cfg)
    sizes = {
        layer_key(i, name): block.get_submodule(name).weight.numel()
        for i, block in enumerate(model.blocks)
        for name in linear_names(model)
    }
    promoted = choose_promoted(scores, sizes, cfg.promote_budget, cfg.wbits)
    return Promotion(cfg.promote_by, cfg.promote_budget, scores, tuple(promoted), time.perf_counter() - start)


def pick_rows(tokens: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """About ``count`` states, evenly spaced within each chunk (tokens [S, L]) and shared among chunks by their
    size, in pieces of at most ``ROWS`` states."""
    total = sum(t.shape[0] for t in tokens)
    pieces = []
    for t in tokens:
        keep = max(1, round(count * t.shape[0] / total))
        index = torch.linspace(0, t.shape[0] - 1, min(keep, t.shape[0])).round().long().unique()
        pieces += [t[part] for part in index.split(ROWS)]
    return pieces


def low_bit_layer(linear: torch.nn.Module, weight: WeightSpec, act: ActSpec) -> QuantizedLayer:
    return QuantizedLayer(rtn_weight(linear.weight.detach(), weight), act)


@contextmanager
def low_bit_student(model: Denoiser, cfg: QuantConfig) -> Iterator[dict[str, QuantLinear]]:
    """Every linear rounded to nearest at ``cfg``'s format (per-token activation scales where the format's are
    static: those are calibrated per block later), the full-precision ones put back on exit. Yields the
    originals by layer key."""
    act = replace(cfg.act_spec(), static_amax=None)
    originals = {}
    try:
        for i, block in enumerate(model.blocks):
            for name in linear_names(model):
                linear = block.get_submodule(name)
                quantized = QuantLinear(low_bit_layer(linear, cfg.weight_spec(), act), linear.bias, model.dtype)
                originals[layer_key(i, name)] = replace_linear(block, name, quantized.to(linear.weight.device))
        yield originals
    finally:
        for key, linear in originals.items():
            index, name = split_layer_key(key)
            replace_linear(model.blocks[index], name, linear)


@torch.no_grad()
def masked_decisions(model: Denoiser, rows: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Per piece of states (tokens [s, L]): the tokens on the model's device, their masked positions [s, L],
    and there the model's two best tokens [N, 2] and the logit gap between them [N]."""
    decisions = []
    for tokens in rows:
        tokens = tokens.to(model.device)
        at = decision_masks([tokens], model.spec)[0]
        top = model(tokens)[at].float().topk(2, dim=-1)
        decisions.append((tokens, at, top.indices, top.values[:, 0] - top.values[:, 1]))
    return decisions


@torch.no_grad()
def promotion_gains(
    model: Denoiser,
    decisions: list[tuple[torch.Tensor, ...]],
    keys: Sequence[str],
    promoted: Callable[[str], nn.Module],
    measure: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any],
) -> dict[str, Any]:
    """Per linear key: ``measure`` (of the logits [N, V] at the decided positions, the teacher's two best tokens
    [N, 2] and gap [N]) summed over ``decisions`` (tokens, positions, best, gap) on ``model`` as it is, minus the
    same with ``promoted(key)`` in that linear's place. Each promotion reruns the model from its linear's block
    on the blocks' inputs, computed once."""
    cached = []
    for tokens, at, best, gap in decisions:
        ctx, hidden, entering = model.block_context(tokens), model.embed(tokens), []
        for block in model.blocks:
            entering.append(hidden)
            hidden = model.run_block(block, hidden, ctx)
        cached.append((ctx, entering, at, best, gap))

    def measured(first: int) -> Any:
        total = 0.0
        for ctx, entering, at, best, gap in cached:
            hidden = entering[first]
            for block in model.blocks[first:]:
                hidden = model.run_block(block, hidden, ctx)
            total = total + measure(model.head(hidden[at].unsqueeze(0))[0], best, gap)
        return total

    base, gains = measured(0), {}
    for key in keys:
        index, name = split_layer_key(key)
        low = replace_linear(model.blocks[index], name, promoted(key))
        gains[key] = base - measured(index)
        replace_linear(model.blocks[index], name, low)
    return gains


@torch.no_grad()
def flip_scores(model: Denoiser, rows: list[torch.Tensor], cfg: QuantConfig) -> dict[str, float]:
    """Per linear: the low-bit student's margin error at the masked positions of ``rows`` minus that with the
    linear alone promoted, against the teacher's (the turned full-precision model's) two best tokens there."""
    decisions = masked_decisions(model, rows)
    specs = promoted_specs(cfg.weight_spec(), replace(cfg.act_spec(), static_amax=None))
    with low_bit_student(model, cfg) as originals:

        def promoted(key: str) -> QuantLinear:
            linear = originals[key]
            return QuantLinear(low_bit_layer(linear, *specs), linear.bias, model.dtype).to(linear.weight.device)

        return promotion_gains(model, decisions, list(originals), promoted, margin_error)


def hessian_scores(model: Denoiser, rows: list[torch.Tensor], cfg: QuantConfig) -> dict[str, float]:
    """Per linear, HAWQ's sensitivity tr(H) / n * ||RTN(W) - W||^2: H the Hessian of the teacher's cross-entropy
    against its own choices at the masked positions, its trace by the empirical Fisher sum_s ||dL_s/dW||^2 over
    the states s taken one at a time."""
    linears = {layer_key(i, name): block.get_submodule(name) for i, block in enumerate(model.blocks)
               for name in linear_names(model)}  # fmt: skip
    params = [linear.weight for linear in linears.values()]
    trace = [torch.zeros((), dtype=torch.float64, device=model.device) for _ in params]
    states = 0
    wanted = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for tokens in rows:
            for row in tokens.to(model.device).split(1):
                mask = decision_masks([row], model.spec)[0]
                with torch.no_grad():
                    choice = model(row).argmax(-1)
                loss = torch.nn.functional.cross_entropy(model(row)[mask].float(), choice[mask])
                for total, grad in zip(trace, torch.autograd.grad(loss, params), strict=True):
                    total += grad.double().pow(2).sum()
                states += 1
    finally:
        for p, flag in zip(params, wanted, strict=True):
            p.requires_grad_(flag)
    spec = cfg.weight_spec()
    scores = {}
    for (key, linear), total in zip(linears.items(), trace, strict=True):
        w = linear.weight.detach().float()
        error = float((rtn_weight(w, spec).dequantize().to(w.device) - w).pow(2).sum())
        scores[key] = float(total) / max(states, 1) / w.numel() * error
    return scores
