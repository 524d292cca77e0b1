"""QuaRot (Ashkboos et al., 2024): fold a randomized Hadamard Q into the weights so the residual stream is
rotated everywhere, which spreads activation outliers across channels and makes 4-bit activations viable.
The model computes the same function before and after.

With column vectors, the rotated residual is x' = Q^T x. RMSNorm commutes with Q once its scale is fused
into the linears that read it, so: embedding rows E Q, readers W Q, writers Q^T W (and their biases
Q^T b), the LM head W Q. The FFN down projection also gets an online Hadamard H on its input (a block
Hadamard, H = H^T) with W_down H absorbing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from faircalib.calib.linear import is_placeholder
from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import OnlineHadamard, random_hadamard
from faircalib.models.base import Denoiser, RotationLayout
from faircalib.models.layers import RMSNorm
from faircalib.models.streaming import visiting


def set_value(param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Overwrite a parameter with ``fn`` of its values in float64, in its own dtype. A placeholder (a weight an
    export's student replaces by its codes) has no values to turn."""
    if is_placeholder(param):
        return
    param.data.copy_(fn(param.detach().double()).to(param.dtype))


def fuse_norm(norm: RMSNorm, readers: list[nn.Linear]) -> None:
    """Move the norm's scale into the readers' input columns and make the norm scale-free."""
    scale = norm.weight.detach().double()
    for linear in readers:
        set_value(linear.weight, lambda w: w * scale)
    norm.weight.data.fill_(1.0)


def block_residual_linears(block: nn.Module, layout: RotationLayout) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(readers, writers) of the residual stream in one block."""
    readers = [block.get_submodule(name) for _, names in layout.norm_readers for name in names]
    return readers, [block.get_submodule(name) for name in layout.writers]


def residual_linears(model: Denoiser, layout: RotationLayout) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(readers, writers) of the residual stream over every block; the LM head and embedding excluded."""
    readers, writers = [], []
    for block in model.blocks:
        mine = block_residual_linears(block, layout)
        readers, writers = readers + mine[0], writers + mine[1]
    return readers, writers


@torch.no_grad()
def fold_rotation(model: Denoiser, layout: RotationLayout, q: torch.Tensor) -> None:
    """Turn the residual stream of a norm-fused model by the orthogonal q [D, D] (float64), in place; each
    block on the model's device while it turns (``visiting``: blocks may wait on the CPU)."""
    dim = model.get_submodule(layout.embedding).weight.shape[1]
    if q.shape != (dim, dim):
        raise ConfigError(f"a rotation of shape {tuple(q.shape)} does not fit this model's residual width {dim}")
    q = q.to(model.device, torch.float64)
    for name in (layout.embedding, layout.head):
        weight = model.get_submodule(name).weight
        set_value(weight, lambda w: w @ q)
    for block in model.blocks:
        with visiting(block, model.device):
            readers, writers = block_residual_linears(block, layout)
            for linear in readers:
                set_value(linear.weight, lambda w: w @ q)
            for linear in writers:
                set_value(linear.weight, lambda w: q.T @ w)
                if linear.bias is not None:
                    set_value(linear.bias, lambda b: q.T @ b)


@torch.no_grad()
def rotate_model(model: Denoiser, seed: int) -> RotationLayout:
    """Rotate ``model`` in place with the randomized Hadamard of ``seed``."""
    layout = model.rotation_layout()
    if layout is None:
        raise ConfigError(
            f"rotation needs pre-norm RMSNorm blocks (LLaDA, Dream); {model.spec.family} models are post-LN: "
            "calibrate without it (--no-rotate)"
        )
    fuse_norm(model.get_submodule(layout.final_norm), [model.get_submodule(layout.head)])
    for block in model.blocks:
        for norm_name, reader_names in layout.norm_readers:
            fuse_norm(block.get_submodule(norm_name), [block.get_submodule(name) for name in reader_names])
    fold_rotation(model, layout, random_hadamard(model.get_submodule(layout.embedding).weight.shape[1], seed))
    for block in model.blocks:
        down = block.get_submodule(layout.ffn_down)
        online = OnlineHadamard(down.weight.shape[1])
        set_value(down.weight, online)  # W H (rows times the symmetric H)
        parent_name, _, child = layout.ffn_down_input.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, online)
    return layout
