"""QuaRot-style rotation (Ashkboos et al., 2024): fold a randomized Hadamard Q into the weights so the
residual stream is rotated everywhere, which spreads activation outliers across channels and makes
4-bit activations viable. The model computes the same function before and after.

With column vectors, the rotated residual is x' = Q^T x. RMSNorm commutes with Q once its scale is fused
into the linears that read it, so: embedding rows E Q, readers W Q, writers Q^T W (and their biases
Q^T b), the LM head W Q. The FFN down projection also gets an online Hadamard H on its input (a block
Hadamard, H = H^T) with W_down H absorbing it.
"""

from __future__ import annotations

import torch
from torch import nn

from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import OnlineHadamard, random_hadamard
from faircalib.models.base import Denoiser, RotationLayout
from faircalib.models.layers import RMSNorm


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def fuse_norm(norm: RMSNorm, readers: list[nn.Linear]) -> None:
    """Move the norm's scale into the readers' input columns and make the norm scale-free."""
    scale = norm.weight.detach().double()
    for linear in readers:
        _set(linear.weight, linear.weight.detach().double() * scale)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def rotate_model(model: Denoiser, seed: int) -> RotationLayout:
    """Rotate ``model`` in place with the randomized Hadamard of ``seed``."""
    layout = model.rotation_layout()
    if layout is None:
        raise ConfigError(
            f"rotation needs pre-norm RMSNorm blocks (LLaDA, Dream); {model.spec.family} models are post-LN: "
            "calibrate without it (--no-rotate)"
        )
    head = model.get_submodule(layout.head)
    fuse_norm(model.get_submodule(layout.final_norm), [head])
    embedding = model.get_submodule(layout.embedding)
    dim = embedding.weight.shape[1]
    q = random_hadamard(dim, seed).to(embedding.weight.device)
    _set(embedding.weight, embedding.weight.detach().double() @ q)
    _set(head.weight, head.weight.detach().double() @ q)
    for block in model.blocks:
        for norm_name, reader_names in layout.norm_readers:
            readers = [block.get_submodule(name) for name in reader_names]
            fuse_norm(block.get_submodule(norm_name), readers)
            for linear in readers:
                _set(linear.weight, linear.weight.detach().double() @ q)
        for name in layout.writers:
            linear = block.get_submodule(name)
            _set(linear.weight, q.T @ linear.weight.detach().double())
            if linear.bias is not None:
                _set(linear.bias, q.T @ linear.bias.detach().double())
        down = block.get_submodule(layout.ffn_down)
        online = OnlineHadamard(down.weight.shape[1])
        _set(down.weight, online(down.weight.detach().double()))  # W H (rows times the symmetric H)
        parent_name, _, child = layout.ffn_down_input.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, online)
    return layout
