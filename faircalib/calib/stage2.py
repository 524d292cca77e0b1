"""Stage II: off-policy, block-by-block streaming calibration (docs/DESIGN.md, "Stage II: block by block").

After the residual stream is turned (QuaRot's Hadamard, and a learned rotation with block transforms on
top), each block in order: accumulate one token-weighted Hessian per linear group from the block's inputs on
the quantized path, quantize every linear (RTN or GPTQ), optionally reconstruct against the full-precision
block's outputs, then push the calibration states through the quantized block to feed the next one. With
``offload`` (the CPU), every other block waits there while one is on the compute device, so a GPU holds one
block's weights, codes and Hessians instead of the whole model's beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from faircalib.calib.config import QuantConfig
from faircalib.calib.forward import run_block_sliced
from faircalib.calib.gptq import gptq_quantize, prepare_hessian
from faircalib.calib.hessian import collect_hessians
from faircalib.calib.hooks import hooked
from faircalib.calib.learned_rotation import LEARNED_KEYS, fold_learned, learn_rotation
from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, install
from faircalib.calib.objectives import decision_masks, weighted_mse
from faircalib.calib.probe import CalibrationSet
from faircalib.calib.promotion import Promotion, promote, promoted_specs
from faircalib.calib.quant import ActSpec
from faircalib.calib.quarot import rotate_model
from faircalib.calib.reconstruction import HeadTerm, ReconReport, reconstruct_block
from faircalib.calib.rtn import rtn_weight
from faircalib.calib.smoothquant import smooth_block
from faircalib.calib.student import layer_key, linear_names, set_fp_params
from faircalib.models.base import BlockContext, Denoiser
from faircalib.models.streaming import resident


@dataclass
class BlockReport:
    index: int
    seconds: float = 0.0
    gptq_retries: int = 0
    output_mse: float | None = None  # weighted block-output error of the final quantized block
    recon: ReconReport | None = None
    resumed: bool = False

    def to_json_dict(self) -> dict:
        out = {"index": self.index, "seconds": round(self.seconds, 3), "gptq_retries": self.gptq_retries}
        out["output_mse"] = self.output_mse
        if self.recon is not None:
            out["recon"] = {"before": self.recon.loss_before, "after": self.recon.loss_after, "kept": self.recon.kept}
        return out


@dataclass
class Calibrated:
    """What Stage II decided: one record per quantized linear, and the full-precision parameters it changed
    (learned transforms by ``LEARNED_KEYS``, e.g. smoothed norm scales by "blocks.{i}.<name>")."""

    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    fp_params: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    promotion: Promotion | None = None  # the linears kept at 8 bits, when a budget was given

    def of_block(self, index: int) -> Calibrated:
        prefix = f"blocks.{index}."
        return Calibrated(
            {k: v for k, v in self.layers.items() if k.startswith(prefix)},
            {k: v for k, v in self.fp_params.items() if k.startswith(prefix)},
        )


def _ignore(*_args) -> None:
    pass


@dataclass
class Events:
    """Callbacks of a Stage II run: progress, checkpoints and measurements."""

    rotation_step: Callable[[], None] = _ignore  # after each step of learning the rotation
    rotation_learned: Callable[[dict[str, torch.Tensor]], None] = _ignore  # the learned transforms, by key
    promoted: Callable[[Promotion], None] = _ignore  # the linears to keep at 8 bits are chosen
    streaming: Callable[[], None] = _ignore  # what needs the whole model is done; blocks now come one by one
    block_done: Callable[[BlockReport, Calibrated], None] = _ignore  # the block's own layers and params


def calibrate(
    model: Denoiser,
    calib: CalibrationSet,
    cfg: QuantConfig,
    *,
    done: Calibrated | None = None,
    events: Events | None = None,
    offload: torch.device | str | None = None,
) -> Calibrated:
    """Quantize ``model``'s blocks in place (their linears become QuantLinear) and return what was decided.

    ``done``: what an interrupted run finished (its blocks are installed as they were and only propagated,
    its learned transforms are not learned again). ``offload``: where every block but the one being
    calibrated waits, from after the rotation to the end (embedding and head stay on the model's device).
    """
    done, events = done or Calibrated(), events or Events()
    device = model.device
    tokens = [c.tokens.to(device) for c in calib.chunks]
    weights = [c.weights.to(device=device, dtype=torch.float32) for c in calib.chunks]
    contexts = [model.block_context(t) for t in tokens]
    result = whole_model(model, cfg, tokens, done, events)
    promoted = set(result.promotion.promoted) if result.promotion is not None else set()
    if offload is not None:
        for block in model.blocks:
            block.to(offload)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    events.streaming()
    with torch.no_grad():
        hidden_q = [model.embed(t) for t in tokens]
    hidden_fp = [h.clone() for h in hidden_q]
    for index, block in enumerate(model.blocks):
        with resident(block):  # placed here, on the compute device, whether or not blocks stream
            start, report = time.perf_counter(), BlockReport(index)
            block.to(device)
            with torch.no_grad():
                targets = [run_block_sliced(model, block, h, c) for h, c in zip(hidden_fp, contexts, strict=True)]
            if all(layer_key(index, name) in done.layers for name in linear_names(model)):
                mine = resume_block(model, block, index, done)
                report.resumed = True
            else:
                head = None  # the logits-level term of the reconstruction, for the last block
                if index == len(model.blocks) - 1 and cfg.head_weight > 0:
                    head = HeadTerm(model.head, decision_masks(tokens, model.spec), cfg.head_weight)
                data = Chunks(hidden_q, targets, contexts, weights)
                mine_promoted = {name for name in linear_names(model) if layer_key(index, name) in promoted}
                mine = calibrate_block(model, block, index, data, cfg, report, head, mine_promoted)
            with torch.no_grad():
                hidden_q = [run_block_sliced(model, block, h, c) for h, c in zip(hidden_q, contexts, strict=True)]
                report.output_mse = chunked_mse(hidden_q, targets, weights)
            hidden_fp = targets
            block.to(offload if offload is not None else device)
            # read after the move: the records must follow their codes off the compute device
            mine.layers = {layer_key(index, name): block.get_submodule(name).layer for name in linear_names(model)}
        result.layers.update(mine.layers)
        result.fp_params.update(mine.fp_params)
        report.seconds = time.perf_counter() - start
        result.blocks.append(report)
        events.block_done(report, mine)
    return result


def whole_model(
    model: Denoiser, cfg: QuantConfig, tokens: list[torch.Tensor], done: Calibrated, events: Events
) -> Calibrated:
    """What needs every block before the first is quantized: the turned residual, then the linears promoted to
    8 bits (each taken from ``done`` when an interrupted run got that far)."""
    result = Calibrated()
    if cfg.rotate:
        result.fp_params.update(turn_residual(model, cfg, tokens, done, events))
    result.promotion = done.promotion
    if cfg.promote_budget > 0 and result.promotion is None:
        result.promotion = promote(model, tokens, cfg)
        events.promoted(result.promotion)
    return result


def turn_residual(
    model: Denoiser, cfg: QuantConfig, tokens: list[torch.Tensor], done: Calibrated, events: Events
) -> dict[str, torch.Tensor]:
    """QuaRot's Hadamard, then the learned rotation and block transforms (learned here unless ``done`` holds
    them) folded on top; returns the learned transforms (float32, as the artifact stores them)."""
    rotate_model(model, cfg.seed)
    learned = {k: v for k, v in done.fp_params.items() if k in LEARNED_KEYS}
    if not learned and cfg.rotation_steps > 0:
        # On uniform token weights: the one objective that turns every block at once is not narrowed to the
        # prior's tokens, whose weights serve GPTQ and the reconstruction (docs/DESIGN.md, "Stage II: the rotation").
        uniform = [torch.ones(t.shape, device=t.device) for t in tokens]
        learned = learn_rotation(
            model, tokens, uniform, decision_masks(tokens, model.spec), cfg.act_spec(), steps=cfg.rotation_steps,
            lr=cfg.rotation_lr, batch=cfg.rotation_batch, seed=cfg.seed, block_transforms=cfg.block_transforms,
            on_step=events.rotation_step,
        )  # fmt: skip
        learned = {key: value.float() for key, value in learned.items()}
        events.rotation_learned(learned)
    fold_learned(model, learned)
    return learned


@dataclass(frozen=True)
class Chunks:
    """One block's calibration data per chunk: inputs on the quantized path [S, L, D], the full-precision
    block's outputs on the full-precision path [S, L, D], block contexts, token weights [S, L]."""

    inputs: Sequence[torch.Tensor]
    targets: Sequence[torch.Tensor]
    contexts: Sequence[BlockContext]
    weights: Sequence[torch.Tensor]


def calibrate_block(
    model: Denoiser, block: nn.Module, index: int, data: Chunks, cfg: QuantConfig, report: BlockReport,
    head: HeadTerm | None, promoted: set[str] = frozenset(),
) -> Calibrated:  # fmt: skip
    """Smooth (optionally), quantize every linear of one block (those named in ``promoted`` at 8 bits), then
    reconstruct (optionally), in place; returns the full-precision parameters it changed (the layers are read
    off the block once it has moved). A promoted linear shares its group's Hessian, taken on the group's
    low-bit inputs."""
    mine = Calibrated()
    if cfg.smooth:  # the full-precision block keeps computing the same function, so the targets stay valid
        smoothed = smooth_block(model, block, data.inputs, data.contexts, cfg.smooth_alpha)
        mine.fp_params.update({layer_key(index, name): value for name, value in smoothed.items()})
    groups, spec = model.linear_groups(), cfg.weight_spec()
    acts = group_activations(model, block, data, cfg)
    if cfg.solver == "gptq":
        hessians = collect_hessians(model, block, groups, data.inputs, data.contexts, data.weights, acts)
    for group in groups:
        prepared = prepare_hessian(hessians[group[0]], cfg.damp, cfg.act_order) if cfg.solver == "gptq" else None
        for name in group:
            w = block.get_submodule(name).weight.detach()
            wspec, act = promoted_specs(spec, acts[group[0]]) if name in promoted else (spec, acts[group[0]])
            if prepared is None:
                weight = rtn_weight(w, wspec)
            else:
                solved = gptq_quantize(w, prepared, wspec)
                report.gptq_retries += solved.retries
                weight = QuantizedWeight(solved.codes, solved.scale, solved.zero, wspec)
            install(block, name, QuantizedLayer(weight, act), model.dtype)
    if cfg.reconstruct and cfg.recon_steps > 0:
        with torch.enable_grad():
            report.recon = reconstruct_block(
                block, lambda b, x, c: model.run_block(b, x, data.contexts[c]), linear_names(model), data.inputs,
                data.targets,
                data.weights, steps=cfg.recon_steps, lr=cfg.recon_lr, batch=cfg.recon_batch, seed=cfg.seed + index,
                head=head,
            )  # fmt: skip
    return mine


def group_activations(model: Denoiser, block: nn.Module, data: Chunks, cfg: QuantConfig) -> dict[str, ActSpec]:
    """The activation spec of each linear group, by its first linear (a group's linears read one input): the
    format's, with the calibrated peak of that input as its static scale under ``a_static``."""
    act = cfg.act_spec()
    names = [group[0] for group in model.linear_groups()]
    if not cfg.a_static:
        return dict.fromkeys(names, act)
    peaks = input_peaks(model, block, names, data.inputs, data.contexts)
    return {name: replace(act, static_amax=peak) for name, peak in peaks.items()}


@torch.no_grad()
def input_peaks(
    model: Denoiser, block: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor],
    contexts: Sequence[BlockContext],
) -> dict[str, float]:  # fmt: skip
    """max |x| over every calibration token of the input of each named linear of ``block``."""
    peaks = dict.fromkeys(names, 0.0)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            peaks[name] = max(peaks[name], float(args[0].detach().abs().amax()))

        return record

    with hooked(block, {name: hook(name) for name in names}, pre=True):
        for x, ctx in zip(inputs, contexts, strict=True):
            run_block_sliced(model, block, x, ctx)
    return peaks


def resume_block(model: Denoiser, block: nn.Module, index: int, done: Calibrated) -> Calibrated:
    """Install a block an interrupted run finished, exactly as it was."""
    mine = done.of_block(index)
    set_fp_params(block, index, mine.fp_params)
    for name in linear_names(model):
        install(block, name, mine.layers[layer_key(index, name)], model.dtype)
    return mine


def chunked_mse(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]):
    """The token-weighted mean squared error over every chunk."""
    total = sum(float(weighted_mse(o, t, w) * w.sum()) for o, t, w in zip(outputs, targets, weights, strict=True))
    return total / sum(float(w.sum()) for w in weights)
