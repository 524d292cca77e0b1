"""Stage II: off-policy, block-by-block streaming calibration (DESIGN.md section 4).

For each block in order: accumulate one token-weighted Hessian per linear group from the block's
inputs on the quantized path, quantize every linear (RTN or GPTQ), optionally run the weighted
reconstruction against the full-precision block outputs, then push the calibration states through the
quantized block to feed the next one. One block is worked on at a time; hidden states of the
calibration set stay on the model's device. With ``offload`` (the CPU), every other block waits there
while one is on the compute device, so the GPU holds a single block's weights, codes and Hessians instead
of the whole model's beside them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from faircalib.calib.config import QuantConfig
from faircalib.calib.forward import run_block_sliced, state_slices
from faircalib.calib.gptq import gptq_quantize
from faircalib.calib.hessian import accumulate_hessian
from faircalib.calib.hooks import hooked
from faircalib.calib.linear import QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.quant import ActSpec, fake_quant_activation, quantize_weight, weight_qparams
from faircalib.calib.recon import HeadTerm, ReconReport, reconstruct_block, weighted_mse
from faircalib.calib.rotation import (
    BLOCK_TRANSFORM_KEYS,
    LEARNED_KEYS,
    ROTATION_KEY,
    fold_block_transforms,
    fold_rotation,
    learn_rotation,
    rotate_model,
)
from faircalib.calib.smooth import smooth_block
from faircalib.calib.states import CalibrationSet
from faircalib.errors import ConfigError
from faircalib.models.base import BlockContext, Denoiser

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    index: int
    seconds: float
    gptq_retries: int = 0
    output_mse: float | None = None  # weighted block-output error of the final quantized block
    recon: ReconReport | None = None
    resumed: bool = False


@dataclass
class CalibrationResult:
    weights: dict[str, QuantizedWeight]  # "blocks.{i}.{name}" -> quantized weight
    act_clips: dict[str, float]  # activation clip ratio per quantized linear, same keys
    act_ranges: dict[str, float] = field(default_factory=dict)  # static activation peak |x| (a_static only)
    fp_params: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. smoothed norm scales
    blocks: list[BlockReport] = field(default_factory=list)


def layer_key(block_index: int, name: str) -> str:
    return f"blocks.{block_index}.{name}"


def rtn_weight(weight: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    spec = cfg.weight_spec()
    scale, zero = weight_qparams(weight.float(), spec)
    return QuantizedWeight(quantize_weight(weight.float(), scale, zero, spec), scale, zero, spec)


@torch.no_grad()
def collect_hessians(
    model: Denoiser,
    block: nn.Module,
    groups: tuple[tuple[str, ...], ...],
    inputs: Sequence[torch.Tensor],
    contexts: Sequence[BlockContext],
    weights: Sequence[torch.Tensor],
    acts: Mapping[str, ActSpec],
) -> dict[str, torch.Tensor]:
    """Normalised weighted Hessian [K, K] (float64) per linear group, keyed by the group's first linear.

    Inputs are fake-quantized first (``acts``, by the same key): GPTQ must see what the quantized layer
    will multiply.
    """
    sums: dict[str, tuple[torch.Tensor | None, float]] = {group[0]: (None, 0.0) for group in groups}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def collect(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = fake_quant_activation(args[0], acts[name])
            sums[name] = accumulate_hessian(*sums[name], x, current["weights"])

        return collect

    with hooked(block, {g[0]: hook(g[0]) for g in groups}, pre=True):
        for x, ctx, w in zip(inputs, contexts, weights, strict=True):
            for part in state_slices(model, block, x, ctx):
                current["weights"] = w[part]
                model.run_block(block, x[part], ctx)
    return {name: h / total for name, (h, total) in sums.items()}


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


def install(block: nn.Module, name: str, weight: QuantizedWeight, act: ActSpec, dtype: torch.dtype) -> QuantLinear:
    layer = block.get_submodule(name)
    quantized = QuantLinear(weight, layer.bias, act, dtype).to(layer.weight.device)
    replace_linear(block, name, quantized)
    return quantized


def check_shapes(model: Denoiser, cfg: QuantConfig) -> None:
    """Fail before any work if a linear's input width does not split into the configured groups."""
    spec = cfg.weight_spec()
    for name in (n for group in model.linear_groups() for n in group):
        spec.groups(model.blocks[0].get_submodule(name).in_features)


def calibrate(
    model: Denoiser,
    calib: CalibrationSet,
    cfg: QuantConfig,
    *,
    done: Mapping[str, QuantizedWeight] | None = None,
    done_clips: Mapping[str, float] | None = None,
    done_ranges: Mapping[str, float] | None = None,
    done_fp: Mapping[str, torch.Tensor] | None = None,
    on_block: Callable[[int, CalibrationResult, BlockReport], None] | None = None,
    on_rotation_step: Callable[[], None] | None = None,
    on_rotation: Callable[[dict[str, torch.Tensor]], None] | None = None,
    offload: torch.device | str | None = None,
    on_streaming: Callable[[], None] | None = None,
) -> CalibrationResult:
    """Quantize ``model``'s blocks in place (their linears become QuantLinear) and return the weights.

    ``done`` / ``done_clips`` / ``done_ranges`` / ``done_fp`` hold what an earlier, interrupted run
    produced: its finished blocks are installed as they were and only propagated, and its learned rotation
    and block transforms (``done_fp[ROTATION_KEY]``, ...) are not learned again. ``on_block(index, result,
    report)`` is called after each block, ``on_rotation(learned)`` once the rotation (and block transforms)
    are learned, by key (for checkpointing), ``on_rotation_step()`` after each step of learning them (for
    progress).

    ``offload``: where every block but the one being calibrated waits (the CPU), from after the rotation
    (learned on the whole model) to the end; the blocks stay there afterwards. None keeps them all on the
    model's device. Embedding and head stay on the model's device either way. ``on_streaming()`` is called
    once everything that needs the whole model is done and the blocks wait where they wait (to measure the
    stages apart).
    """
    if cfg.head_bits != 16:
        raise ConfigError("quantizing the LM head is not implemented yet: keep head_bits 16")
    done, done_clips, done_fp = dict(done or {}), dict(done_clips or {}), dict(done_fp or {})
    done_ranges = dict(done_ranges or {})
    device, dtype = model.device, model.dtype
    act = cfg.act_spec()
    names = [name for group in model.linear_groups() for name in group]
    tokens = [c.tokens.to(device) for c in calib.chunks]
    weights = [c.weights.to(device=device, dtype=torch.float32) for c in calib.chunks]
    contexts = [model.block_context(t) for t in tokens]
    result = CalibrationResult({}, {})
    if cfg.rotate:
        rotate_model(model, cfg.seed)
        learned = {k: v for k, v in done_fp.items() if k in LEARNED_KEYS}
        if not learned and cfg.rotation_steps > 0:
            uniform = cfg.rotation_weights == "uniform"
            rotation_weights = [torch.ones_like(w) for w in weights] if uniform else weights
            learned = learn_rotation(
                model, tokens, rotation_weights, decision_masks(tokens, model.spec), act, steps=cfg.rotation_steps,
                lr=cfg.rotation_lr, batch=cfg.rotation_batch, seed=cfg.seed, block_transforms=cfg.block_transforms,
                on_step=on_rotation_step,
            )  # fmt: skip
            # float32, as the artifact stores them, so the student is turned by exactly what calibration saw
            learned = {key: value.float() for key, value in learned.items()}
            if on_rotation is not None:
                on_rotation(learned)
        fold_learned(model, learned)
        result.fp_params.update(learned)
    if offload is not None:
        for block in model.blocks:
            block.to(offload)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if on_streaming is not None:
        on_streaming()

    with torch.no_grad():
        hidden_q = [model.embed(t) for t in tokens]
    hidden_fp = [h.clone() for h in hidden_q]

    for index, block in enumerate(model.blocks):
        start = time.perf_counter()
        report = BlockReport(index, 0.0)
        if offload is not None:
            block.to(device)
        with torch.no_grad():
            targets = [run_block_sliced(model, block, h, c) for h, c in zip(hidden_fp, contexts, strict=True)]
        keys = {name: layer_key(index, name) for name in names}

        if all(key in done for key in keys.values()):
            set_fp_params(block, index, done_fp)
            for name, key in keys.items():
                install(block, name, done[key], layer_act(act, done_clips.get(key), done_ranges.get(key)), dtype)
            result.fp_params.update({k: v for k, v in done_fp.items() if k.startswith(f"blocks.{index}.")})
            report.resumed = True
        else:
            last = index == len(model.blocks) - 1
            head = HeadTerm(model.head, decision_masks(tokens, model.spec), cfg.head_weight) if last else None
            calibrate_block(model, block, index, hidden_q, targets, contexts, weights, cfg, report, result, head)

        with torch.no_grad():
            hidden_q = [run_block_sliced(model, block, h, c) for h, c in zip(hidden_q, contexts, strict=True)]
            mse = sum(
                float(weighted_mse(q, t, w) * w.sum()) for q, t, w in zip(hidden_q, targets, weights, strict=True)
            )
            report.output_mse = mse / sum(float(w.sum()) for w in weights)
        hidden_fp = targets
        if offload is not None:
            block.to(offload)
        result.weights.update({keys[n]: block.get_submodule(n).quantized for n in names})
        for name in names:
            layer_spec = block.get_submodule(name).act
            result.act_clips[keys[name]] = layer_spec.clip_ratio
            if layer_spec.static_amax is not None:
                result.act_ranges[keys[name]] = layer_spec.static_amax
        report.seconds = time.perf_counter() - start
        result.blocks.append(report)
        if on_block is not None:
            on_block(index, result, report)
    return result


def calibrate_block(
    model: Denoiser,
    block: nn.Module,
    index: int,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    contexts: Sequence[BlockContext],
    weights: Sequence[torch.Tensor],
    cfg: QuantConfig,
    report: BlockReport,
    result: CalibrationResult,
    head: HeadTerm | None,
) -> None:
    """Smooth (optionally), quantize every linear of one block, then reconstruct (optionally), in place.

    ``inputs`` are the block's inputs on the quantized path, ``targets`` the full-precision block's
    outputs on the full-precision path, per calibration chunk.
    """
    if cfg.smooth_alpha is not None:
        # The full-precision block keeps computing the same function, so the targets stay valid.
        smoothed = smooth_block(model, block, inputs, contexts, cfg.smooth_alpha)
        result.fp_params.update({layer_key(index, name): value for name, value in smoothed.items()})
    groups = model.linear_groups()
    act, spec = cfg.act_spec(), cfg.weight_spec()
    acts = {group[0]: act for group in groups}  # every linear of a group reads the same input
    if cfg.a_static:
        peaks = input_peaks(model, block, list(acts), inputs, contexts)
        acts = {name: replace(act, static_amax=peak) for name, peak in peaks.items()}
    hessians = collect_hessians(model, block, groups, inputs, contexts, weights, acts) if cfg.solver == "gptq" else {}
    for group in groups:
        for name in group:
            w = block.get_submodule(name).weight.detach()
            if cfg.solver == "gptq":
                solved = gptq_quantize(w, hessians[group[0]], spec, damp=cfg.damp, act_order=cfg.act_order)
                report.gptq_retries += solved.retries
                quantized = QuantizedWeight(solved.codes, solved.scale, solved.zero, spec)
            else:
                quantized = rtn_weight(w, cfg)
            install(block, name, quantized, acts[group[0]], model.dtype)
    if cfg.reconstruct and cfg.recon_steps > 0:
        names = [name for group in groups for name in group]
        with torch.enable_grad():
            report.recon = reconstruct_block(
                block, lambda b, x, c: model.run_block(b, x, contexts[c]), names, inputs, targets, weights,
                steps=cfg.recon_steps, lr=cfg.recon_lr, batch=cfg.recon_batch, seed=cfg.seed + index,
                head=head if cfg.head_weight > 0 else None,
            )  # fmt: skip


def decision_masks(tokens: Sequence[torch.Tensor], spec) -> list[torch.Tensor]:
    """Per chunk [S, L] bool: the logit positions that decide masked tokens (shifted for Dream-style models)."""
    masks = []
    for t in tokens:
        masked = t == spec.mask_token_id
        if spec.logit_shift:  # position j is decided by the logits at j - 1 (and position 0 by its own)
            shifted = torch.zeros_like(masked)
            shifted[:, :-1] = masked[:, 1:]
            shifted[:, 0] |= masked[:, 0]
            masked = shifted
        masks.append(masked)
    return masks


def fold_learned(model: Denoiser, learned: Mapping[str, torch.Tensor]) -> None:
    """Fold a learned rotation and, if any, learned block transforms into a model ``rotate_model`` turned."""
    layout = model.rotation_layout()
    if ROTATION_KEY in learned:
        fold_rotation(model, layout, learned[ROTATION_KEY])
    if any(key in learned for key in BLOCK_TRANSFORM_KEYS):
        if ROTATION_KEY not in learned:
            raise ConfigError("learned block transforms come with a learned rotation; this has none")
        fold_block_transforms(model, layout, dict(learned))


def set_fp_params(block: nn.Module, index: int, params: Mapping[str, torch.Tensor]) -> None:
    """Copy full-precision parameters recorded under "blocks.{index}.<name>" into ``block``."""
    prefix = f"blocks.{index}."
    for key, value in params.items():
        if key.startswith(prefix):
            target = block.get_parameter(key[len(prefix) :])
            target.data.copy_(value.to(device=target.device, dtype=target.dtype))


def layer_act(act: ActSpec, clip: float | None, static_amax: float | None) -> ActSpec:
    """The format's activation spec with one layer's calibrated clip ratio and static peak (if any)."""
    if not act.enabled:
        return act
    return replace(act, clip_ratio=act.clip_ratio if clip is None else clip, static_amax=static_amax)


def apply_quantization(
    model: Denoiser,
    weights: Mapping[str, QuantizedWeight],
    cfg: QuantConfig,
    clips: Mapping[str, float],
    fp_params: Mapping[str, torch.Tensor] | None = None,
    ranges: Mapping[str, float] | None = None,
) -> Denoiser:
    """Turn a full-precision model into the fake-quant student of an artifact (in place): rotated as it was
    at calibration, calibrated full-precision parameters restored, every linear replaced."""
    learned = {k: v for k, v in (fp_params or {}).items() if k in LEARNED_KEYS}
    if cfg.rotate:
        rotate_model(model, cfg.seed)
        fold_learned(model, learned)
    elif learned:
        raise ConfigError("the artifact holds a learned rotation, but its config does not rotate")
    act, ranges = cfg.act_spec(), ranges or {}
    for index, block in enumerate(model.blocks):
        set_fp_params(block, index, fp_params or {})
        for group in model.linear_groups():
            for name in group:
                key = layer_key(index, name)
                if key not in weights:
                    raise ConfigError(f"the artifact has no weights for {key}")
                if cfg.a_static and key not in ranges:
                    raise ConfigError(f"the artifact has no static activation range for {key}")
                install(block, name, weights[key], layer_act(act, clips.get(key), ranges.get(key)), model.dtype)
    return model
