"""One block over a whole calibration chunk, a slice of states at a time.

A chunk is every calibration state of one sequence length (a thousand by default). Run at once through a block
of an 8B model, each wide FFN activation and its float32 fake-quantized copy would take gigabytes.
"""

from __future__ import annotations

import torch
from torch import nn

from faircalib.models.base import BlockContext, Denoiser

SLICE_BYTES = 2**28


def states_per_slice(model: Denoiser, block: nn.Module, length: int, slice_bytes: int = SLICE_BYTES) -> int:
    """How many states of ``length`` tokens keep the block's widest linear activation, in float32, within
    ``slice_bytes``. The bundled model's chunks fit in one slice: its calibrations take the very products
    an unsliced forward takes."""
    layers = [block.get_submodule(name) for group in model.linear_groups() for name in group]
    widest = max(max(layer.in_features, layer.out_features) for layer in layers)
    return max(1, slice_bytes // (4 * length * widest))


def state_slices(
    model: Denoiser, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, slice_bytes: int = SLICE_BYTES
) -> list[slice]:
    """The slices of ``hidden``'s states [S, L, D] to run ``block`` over, ``states_per_slice`` at a time.

    Each state is computed on its own either way: a context holds per-position tables, the same for every
    state, except an attention bias with a batch dimension, which keeps the chunk whole.
    """
    rows = states_per_slice(model, block, hidden.shape[1], slice_bytes)
    bias = ctx.attention_bias
    if hidden.shape[0] <= rows or (bias is not None and bias.dim() == 4 and bias.shape[0] > 1):
        return [slice(None)]
    return [slice(start, start + rows) for start in range(0, hidden.shape[0], rows)]


def run_block_sliced(
    model: Denoiser, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, slice_bytes: int = SLICE_BYTES
) -> torch.Tensor:
    """``model.run_block(block, hidden [S, L, D], ctx)`` over ``state_slices``."""
    parts = state_slices(model, block, hidden, ctx, slice_bytes)
    if len(parts) == 1:
        return model.run_block(block, hidden, ctx)
    return torch.cat([model.run_block(block, hidden[part], ctx) for part in parts])
