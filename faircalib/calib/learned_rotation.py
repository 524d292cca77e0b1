"""A residual rotation learned on top of QuaRot's Hadamard (SpinQuant, Liu et al., 2024): R = exp(A - A^T) is
fitted through 4-bit activation quantization to the KL between the full-precision model's and the quantized
model's output distributions where decisions are made, and folded into the weights as the Hadamard is. It
stays an offline rotation of the residual stream, so the exported graph does not change. The block transforms
(``block_transforms``) can be learned with it, on the same objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from faircalib.calib.block_transforms import (
    BLOCK_TRANSFORM_KEYS,
    FFN_SCALE_KEY,
    NORM_SCALE_KEY,
    VALUE_KEY,
    block_maps,
    block_transform_shapes,
    fold_block_transforms,
)
from faircalib.calib.forward import run_block_sliced
from faircalib.calib.hooks import hooked
from faircalib.calib.objectives import adam_cosine, weighted_kl
from faircalib.calib.quant import ActSpec, fake_quant_activation
from faircalib.calib.quarot import fold_rotation, residual_linears
from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser, RotationLayout

ROTATION_KEY = "rotation"  # the learned residual rotation [D, D]
LEARNED_KEYS = (ROTATION_KEY, *BLOCK_TRANSFORM_KEYS)  # what ``learn_rotation`` may return


def skew_rotation(a: torch.Tensor) -> torch.Tensor:
    """exp(A - A^T): an orthogonal [D, D] matrix for any A [D, D], the identity at A = 0."""
    return torch.linalg.matrix_exp(a - a.T)


class _Through(nn.Module):
    """Parametrization of a weight as a function of the transforms being learned: ``fn(value)`` reads them
    from a plain dict the learning loop refills every step, so every weight sees the step's one set."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.fn(value)


class _Learned:
    """The free parameters of what ``learn_rotation`` learns and the transforms they make.

    R = exp(A - A^T); per block, T_k = exp(B_k - B_k^T) diag(e^c_k) and the scales e^n, e^f. At zero every
    transform is the identity, so learning starts from the model as it is."""

    def __init__(self, model: Denoiser, layout: RotationLayout, blocks: bool):
        device = model.device
        dim = model.get_submodule(layout.embedding).weight.shape[1]
        self.a = torch.zeros(dim, dim, device=device, requires_grad=True)
        self.blocks = blocks
        if blocks:
            shapes = block_transform_shapes(model, layout)
            zeros = lambda shape: torch.zeros(shape, device=device, requires_grad=True)  # noqa: E731
            self.b = zeros(shapes[VALUE_KEY])
            self.c = zeros(shapes[VALUE_KEY][:-1])
            self.n = zeros(shapes[NORM_SCALE_KEY])
            self.f = zeros(shapes[FFN_SCALE_KEY])

    def parameters(self) -> list[torch.Tensor]:
        return [self.a, self.b, self.c, self.n, self.f] if self.blocks else [self.a]

    def current(self) -> dict[str, torch.Tensor]:
        """What the weights read this step, by ``LEARNED_KEYS`` (and "t_inv_t", each T's inverse transpose)."""
        return _made(self.parameters())

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        made = _made([p.double() for p in self.parameters()])
        return {key: made[key] for key in LEARNED_KEYS if key in made}


def _made(params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transforms of ``_Learned``'s free parameters [A] or [A, B, c, n, f], by ``LEARNED_KEYS``."""
    out = {ROTATION_KEY: skew_rotation(params[0])}
    if len(params) > 1:
        b, c, n, f = params[1:]
        r = torch.linalg.matrix_exp(b - b.transpose(-1, -2))
        out[VALUE_KEY] = r * c.exp().unsqueeze(-2)  # R diag(e^c)
        out["t_inv_t"] = r * (-c).exp().unsqueeze(-2)  # (R diag(e^c))^-T = R diag(e^-c)
        out[NORM_SCALE_KEY], out[FFN_SCALE_KEY] = n.exp(), f.exp()
    return out


@contextlib.contextmanager
def _parametrized(model: Denoiser, layout: RotationLayout, now: dict[str, torch.Tensor], blocks: bool):
    """Make every weight the learned transforms touch read them from ``now`` while the context is open. The
    residual rotation goes first, as ``fold_rotation`` precedes ``fold_block_transforms``."""
    done = []

    def through(module: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        parametrize.register_parametrization(module, name, _Through(fn))
        done.append((module, name))

    try:
        readers, writers = residual_linears(model, layout)
        for linear in readers:
            through(linear, "weight", lambda w: w @ now[ROTATION_KEY].to(w.dtype))
        for linear in writers:
            through(linear, "weight", lambda w: now[ROTATION_KEY].T.to(w.dtype) @ w)
            if linear.bias is not None:  # a reader's bias lives on its output side
                through(linear, "bias", lambda b: now[ROTATION_KEY].T.to(b.dtype) @ b)
        for i, block in enumerate(model.blocks if blocks else ()):
            for module, name, fn in block_maps(block, layout, lambda key, i=i: now[key][i]):
                through(module, name, fn)
        yield
    finally:
        for module, name in reversed(done):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """No gradient for the model's own weights while the context is open: only the transforms are learned, and
    a weight gradient would cost a GEMM per linear per step and a weight-sized buffer each."""
    params = list(model.parameters())
    wanted = [p.requires_grad for p in params]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(params, wanted, strict=True):
            param.requires_grad_(flag)


@torch.no_grad()
def _final_hidden(model: Denoiser, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The full-precision final hidden states [S, L, D] of every chunk, before any quantization hook."""
    targets = []
    for t in tokens:
        hidden, ctx = model.embed(t), model.block_context(t)
        for block in model.blocks:
            hidden = run_block_sliced(model, block, hidden, ctx)
        targets.append(hidden)
    return targets


def _rotated_kl(
    model: Denoiser, r: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The weighted KL at decision positions ``mask`` between the teacher's logits (from its final hidden
    states ``target``) and the hooked model turned by ``r``; blocks are recomputed in the backward pass."""
    ctx = model.block_context(ids)
    r = r.to(model.dtype)
    hidden = model.embed(ids) @ r  # the embedding's rows E R
    for block in model.blocks:
        hidden = checkpoint(model.run_block, block, hidden, ctx, use_reentrant=False)
    logits = model.head(hidden[mask] @ r.T)  # the head's W R, read on the turned residual
    with torch.no_grad():
        teacher = model.head(target[mask])
    return weighted_kl(logits, teacher, weights[mask])


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
    block_transforms: bool = False,
    on_step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Learn an orthogonal R [D, D] (float64) on top of the model's current residual basis, and with
    ``block_transforms`` the per-block transforms of ``fold_block_transforms``; return them by key
    (``LEARNED_KEYS``). The model is left unchanged.

    ``model`` must be norm-fused (``rotate_model``). Per chunk, ``tokens`` [S, L] are the calibration
    states, ``weights`` [S, L] their token weights and ``decision_masks`` [S, L] the logit positions that
    decide a masked token; the objective is the weighted KL there between the model at full precision and
    the model with every block linear's input fake-quantized to ``act`` (straight-through). Weights stay at
    full precision: on W4A4 models the 4-bit activations are what flip decisions.
    """
    layout = model.rotation_layout()
    targets = _final_hidden(model, tokens)
    learned = _Learned(model, layout, block_transforms)
    now = {key: value.detach() for key, value in learned.current().items()}

    def quantize_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (fake_quant_activation(args[0], act, ste=True),)

    names = [name for group in model.linear_groups() for name in group]
    optimizer, schedule = adam_cosine(learned.parameters(), lr, steps)
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([float(t.shape[0]) for t in tokens])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_frozen(model))
        stack.enter_context(_parametrized(model, layout, now, block_transforms))
        for block in model.blocks:
            stack.enter_context(hooked(block, dict.fromkeys(names, quantize_input), pre=True))
        for _ in range(steps):
            c = int(torch.multinomial(sizes, 1, generator=generator))
            rows = torch.randperm(tokens[c].shape[0], generator=generator)[:batch].to(model.device)
            now.update(learned.current())
            loss = _rotated_kl(
                model, now[ROTATION_KEY], tokens[c][rows], targets[c][rows], weights[c][rows], decision_masks[c][rows]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step()
    return learned.result()


def fold_learned(model: Denoiser, learned: Mapping[str, torch.Tensor]) -> None:
    """Fold a learned rotation and, if any, learned block transforms into a model ``rotate_model`` turned."""
    layout = model.rotation_layout()
    if ROTATION_KEY in learned:
        fold_rotation(model, layout, learned[ROTATION_KEY])
    if any(key in learned for key in BLOCK_TRANSFORM_KEYS):
        if ROTATION_KEY not in learned:
            raise ConfigError("learned block transforms come with a learned rotation; this has none")
        fold_block_transforms(model, layout, dict(learned))
