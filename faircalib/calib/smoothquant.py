"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a per-channel scale
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) between a norm and the linears reading it. The norm's scale
absorbs 1/s and the readers' input columns absorb s, so the block computes the same function."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from faircalib.calib.forward import run_block_sliced
from faircalib.calib.hooks import hooked
from faircalib.errors import ConfigError
from faircalib.models.base import BlockContext, Denoiser


@torch.no_grad()
def norm_output_absmax(
    model: Denoiser, block: nn.Module, norm_names: Sequence[str], inputs: Sequence[torch.Tensor],
    contexts: Sequence[BlockContext],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-channel max |output| [D] of each named norm over the calibration inputs of ``block``."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, _args, output: torch.Tensor) -> None:
            peak = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        return record

    with hooked(block, {name: hook(name) for name in norm_names}, pre=False):
        for x, ctx in zip(inputs, contexts, strict=True):
            run_block_sliced(model, block, x, ctx)
    return peaks


def smoothing_scale(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [D] for activations with per-channel peaks [D] read by linears with weights [N_i, D]."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    scale = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return scale.clamp_min(1e-5)


@torch.no_grad()
def smooth_block(
    model: Denoiser, block: nn.Module, inputs: Sequence[torch.Tensor], contexts: Sequence[BlockContext],
    alpha: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Apply SmoothQuant to every (norm -> readers) pair of one block, in place. Returns the new norm
    scales by name (relative to the block): full-precision parameters the artifact must carry."""
    layout = model.rotation_layout()
    if layout is None:
        raise ConfigError(f"SmoothQuant needs pre-norm RMSNorm blocks (LLaDA, Dream), not {model.spec.family}")
    peaks = norm_output_absmax(model, block, [norm for norm, _ in layout.norm_readers], inputs, contexts)
    changed = {}
    for norm_name, reader_names in layout.norm_readers:
        norm = block.get_submodule(norm_name)
        readers = [block.get_submodule(name) for name in reader_names]
        scale = smoothing_scale(peaks[norm_name], [r.weight for r in readers], alpha)
        norm.weight.div_(scale.to(norm.weight.dtype))
        for reader in readers:
            reader.weight.mul_(scale.to(reader.weight.dtype))
        changed[f"{norm_name}.weight"] = norm.weight.detach().clone()
    return changed
