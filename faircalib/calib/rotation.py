"""QuaRot-style rotation (Ashkboos et al., 2024): fold a randomized Hadamard Q into the weights so the
residual stream is rotated everywhere, which spreads activation outliers across channels and makes
4-bit activations viable. The model computes the same function before and after.

With column vectors, the rotated residual is x' = Q^T x. RMSNorm commutes with Q once its scale is fused
into the linears that read it, so: embedding rows E Q, readers W Q, writers Q^T W (and their biases
Q^T b), the LM head W Q. The FFN down projection also gets an online Hadamard H on its input (a block
Hadamard, H = H^T) with W_down H absorbing it.

On top of the Hadamard, a second rotation R can be learned (SpinQuant, Liu et al., 2024): R = exp(A - A^T)
is fitted through 4-bit activation quantization to the token-weighted KL between the full-precision
model's and the quantized model's output distributions where decisions are made, and folded the same
way. It stays an offline rotation of the residual stream, so the exported graph does not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from faircalib.calib.hooks import hooked
from faircalib.calib.quant import ActSpec, fake_quant_activation
from faircalib.calib.recon import weighted_kl
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


def residual_linears(model: Denoiser, layout: RotationLayout) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(readers, writers) of the residual stream over every block; the LM head and embedding excluded."""
    readers, writers = [], []
    for block in model.blocks:
        readers += [block.get_submodule(name) for _, names in layout.norm_readers for name in names]
        writers += [block.get_submodule(name) for name in layout.writers]
    return readers, writers


@torch.no_grad()
def fold_rotation(model: Denoiser, layout: RotationLayout, q: torch.Tensor) -> None:
    """Turn the residual stream of a norm-fused model by the orthogonal q [D, D] (float64), in place."""
    dim = model.get_submodule(layout.embedding).weight.shape[1]
    if q.shape != (dim, dim):
        raise ConfigError(f"a rotation of shape {tuple(q.shape)} does not fit this model's residual width {dim}")
    q = q.to(model.device, torch.float64)
    for name in (layout.embedding, layout.head):
        weight = model.get_submodule(name).weight
        _set(weight, weight.detach().double() @ q)
    readers, writers = residual_linears(model, layout)
    for linear in readers:
        _set(linear.weight, linear.weight.detach().double() @ q)
    for linear in writers:
        _set(linear.weight, q.T @ linear.weight.detach().double())
        if linear.bias is not None:
            _set(linear.bias, q.T @ linear.bias.detach().double())


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
        _set(down.weight, online(down.weight.detach().double()))  # W H (rows times the symmetric H)
        parent_name, _, child = layout.ffn_down_input.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, online)
    return layout


def skew_rotation(a: torch.Tensor) -> torch.Tensor:
    """exp(A - A^T): an orthogonal [D, D] matrix for any A [D, D], the identity at A = 0."""
    return torch.linalg.matrix_exp(a - a.T)


class _Turned(nn.Module):
    """Parametrization of one residual weight under the rotation being learned: readers W R, writers R^T W."""

    def __init__(self, current: dict[str, torch.Tensor], reader: bool):
        super().__init__()
        self.current = current  # a plain dict, so every weight shares the one R of the step
        self.reader = reader

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        r = self.current["r"].to(value.dtype)
        return value @ r if self.reader else r.T @ value


def learn_rotation(
    model: Denoiser,
    tokens: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    decision_masks: Sequence[torch.Tensor],
    act: ActSpec,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Learn an orthogonal R [D, D] (float64) on top of the model's current residual basis and return it;
    the model is left unchanged.

    ``model`` must be norm-fused (``rotate_model``). Per chunk, ``tokens`` [S, L] are the calibration
    states, ``weights`` [S, L] their token weights and ``decision_masks`` [S, L] the logit positions that
    decide a masked token; the objective is the weighted KL there between the model at full precision and
    the model with every block linear's input fake-quantized to ``act`` (straight-through). Weights stay at
    full precision: on W4A4 models the 4-bit activations are what flip decisions (docs/RESULTS.md).
    Blocks are recomputed in the backward pass (activation checkpointing), so only block inputs are kept.
    Adam's step size decays from ``lr`` to zero on a cosine: at a constant step size the last minibatches
    decided where R ended up, and a calibration landed in one of two outcomes, a good and a bad one
    (docs/RESULTS.md).
    """
    layout = model.rotation_layout()
    dim = model.get_submodule(layout.embedding).weight.shape[1]
    device = model.device
    contexts = [model.block_context(t) for t in tokens]
    with torch.no_grad():
        targets = []  # the full-precision final hidden states, before any quantization hook
        for t, ctx in zip(tokens, contexts, strict=True):
            hidden = model.embed(t)
            for block in model.blocks:
                hidden = model.run_block(block, hidden, ctx)
            targets.append(hidden)

    a = torch.zeros(dim, dim, device=device, requires_grad=True)
    current = {"r": torch.eye(dim, device=device)}
    readers, writers = residual_linears(model, layout)
    for reader, linears in ((True, readers), (False, writers)):
        for linear in linears:
            parametrize.register_parametrization(linear, "weight", _Turned(current, reader))
            if linear.bias is not None and not reader:  # a reader's bias lives on its output side
                parametrize.register_parametrization(linear, "bias", _Turned(current, reader))

    def quantize_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (fake_quant_activation(args[0], act, ste=True),)

    names = [name for group in model.linear_groups() for name in group]
    optimizer = torch.optim.Adam([a], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([float(t.shape[0]) for t in tokens])
    try:
        with contextlib.ExitStack() as stack:
            for block in model.blocks:
                stack.enter_context(hooked(block, dict.fromkeys(names, quantize_input), pre=True))
            for _ in range(steps):
                c = int(torch.multinomial(sizes, 1, generator=generator))
                rows = torch.randperm(tokens[c].shape[0], generator=generator)[:batch].to(device)
                ids, mask = tokens[c][rows], decision_masks[c][rows]
                ctx = model.block_context(ids)
                r = skew_rotation(a)
                current["r"] = r
                hidden = model.embed(ids) @ r  # the embedding's rows E R
                for block in model.blocks:
                    hidden = checkpoint(model.run_block, block, hidden, ctx, use_reentrant=False)
                logits = model.head(hidden[mask] @ r.T)  # the head's W R, read on the turned residual
                with torch.no_grad():
                    teacher = model.head(targets[c][rows][mask])
                loss = weighted_kl(logits, teacher, weights[c][rows][mask])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if on_step is not None:
                    on_step()
    finally:
        for linear in readers + writers:
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(linear, name):
                    parametrize.remove_parametrizations(linear, name, leave_parametrized=False)
    with torch.no_grad():
        return skew_rotation(a.detach().double())
