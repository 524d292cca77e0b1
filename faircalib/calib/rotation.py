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

With it, per-block transforms can be learned too (OmniQuant's and FlatQuant's idea, restricted to what
folds exactly into the weights): an invertible T_k = R_k diag(e^s_k) per value head, V_k T_k, whose inverse
the attention output projection's input columns absorb (attention mixes tokens linearly within a head);
a per-channel scale s on each norm's output, norm weight / s and readers' columns times s; and one on the
FFN's linear branch, up rows / s, the down projection's input columns times s before the online Hadamard.
They change what each 4-bit activation quantizer sees, not what the model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from faircalib.calib.forward import run_block_sliced
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


ROTATION_KEY = "rotation"  # the learned residual rotation [D, D]
VALUE_KEY = "value_transform"  # [blocks, value heads, head dim, head dim]: T per value head
NORM_SCALE_KEY = "norm_scale"  # [blocks, norms, D]: the readers' column scales s (norm weight / s)
FFN_SCALE_KEY = "ffn_scale"  # [blocks, F]: the down projection's input column scales s (up rows / s)
BLOCK_TRANSFORM_KEYS = (VALUE_KEY, NORM_SCALE_KEY, FFN_SCALE_KEY)
LEARNED_KEYS = (ROTATION_KEY, *BLOCK_TRANSFORM_KEYS)  # what ``learn_rotation`` may return


def value_rows(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """T_k^T W_k for each value head k, so that head's output becomes V_k T_k.

    weight: [heads * dh, ...] (a weight, or a bias [heads * dh]); t: [heads, dh, dh]."""
    heads, dh, _ = t.shape
    return (t.transpose(1, 2) @ weight.reshape(heads, dh, -1)).reshape(weight.shape)


def out_columns(weight: torch.Tensor, t_inv_t: torch.Tensor, query_heads: int) -> torch.Tensor:
    """W_h T_k^-T for each query head h's input columns, k = h // (query_heads / value heads) as in
    grouped-query attention, which undoes ``value_rows``. weight: [N, query_heads * dh]; t_inv_t: [value
    heads, dh, dh], each T_k's inverse transpose."""
    heads, dh, _ = t_inv_t.shape
    per_query = t_inv_t.repeat_interleave(query_heads // heads, dim=0)
    return torch.einsum("nhi,hij->nhj", weight.reshape(-1, query_heads, dh), per_query).reshape(weight.shape)


def down_columns(weight: torch.Tensor, scale: torch.Tensor, online: OnlineHadamard) -> torch.Tensor:
    """W H diag(s) H for a down projection W [D, F] that reads H z: it then reads H (z / s) instead."""
    return online(online(weight) * scale)


def block_transform_shapes(model: Denoiser, layout: RotationLayout) -> dict[str, tuple[int, ...]]:
    """The shape of each of ``BLOCK_TRANSFORM_KEYS`` for ``model``."""
    n, block = len(model.blocks), model.blocks[0]
    dim = model.get_submodule(layout.embedding).weight.shape[1]
    dh = block.get_submodule(layout.value).weight.shape[0] // layout.value_heads
    return {
        VALUE_KEY: (n, layout.value_heads, dh, dh),
        NORM_SCALE_KEY: (n, len(layout.norm_readers), dim),
        FFN_SCALE_KEY: (n, block.get_submodule(layout.ffn_up).weight.shape[0]),
    }


def check_block_transforms(model: Denoiser, layout: RotationLayout, transforms: dict[str, torch.Tensor]) -> None:
    """Refuse block transforms that are missing, were learned for another shape of model, or cannot fold."""
    for key, shape in block_transform_shapes(model, layout).items():
        if key not in transforms:
            raise ConfigError(f"the block transforms lack {key!r}")
        if tuple(transforms[key].shape) != shape:
            raise ConfigError(f"{key} has shape {tuple(transforms[key].shape)}; this model needs {shape}")
        if not torch.isfinite(transforms[key]).all():
            raise ConfigError(f"{key} holds NaN or infinite values")
    if not all(bool((transforms[key] > 0).all()) for key in (NORM_SCALE_KEY, FFN_SCALE_KEY)):
        raise ConfigError("block transform scales must be positive")


def _block_maps(
    block: nn.Module, layout: RotationLayout, current: Callable[[str], torch.Tensor]
) -> list[tuple[nn.Module, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(module, tensor name, map) for every tensor one block's transforms change. ``current(key)`` gives
    the block's share of a ``BLOCK_TRANSFORM_KEYS`` transform when a map runs, and "t_inv_t" [value heads,
    dh, dh] each T's inverse transpose; folding reads fixed tensors, learning the ones of the step."""
    v, out = block.get_submodule(layout.value), block.get_submodule(layout.attn_out)
    maps = [(v, "weight", lambda w: value_rows(w, current(VALUE_KEY).to(w.dtype)))]
    if v.bias is not None:
        maps.append((v, "bias", lambda b: value_rows(b, current(VALUE_KEY).to(b.dtype))))
    maps.append((out, "weight", lambda w: out_columns(w, current("t_inv_t").to(w.dtype), layout.query_heads)))
    for k, (norm_name, reader_names) in enumerate(layout.norm_readers):
        scale = lambda w, k=k: current(NORM_SCALE_KEY)[k].to(w.dtype)  # noqa: E731
        maps.append((block.get_submodule(norm_name), "weight", lambda w, scale=scale: w / scale(w)))
        for name in reader_names:
            maps.append((block.get_submodule(name), "weight", lambda w, scale=scale: w * scale(w)))
    up, down = block.get_submodule(layout.ffn_up), block.get_submodule(layout.ffn_down)
    online = block.get_submodule(layout.ffn_down_input)
    maps.append((up, "weight", lambda w: w / current(FFN_SCALE_KEY).unsqueeze(1).to(w.dtype)))
    maps.append((down, "weight", lambda w: down_columns(w, current(FFN_SCALE_KEY).to(w.dtype), online)))
    return maps


@torch.no_grad()
def fold_block_transforms(model: Denoiser, layout: RotationLayout, transforms: dict[str, torch.Tensor]) -> None:
    """Fold learned per-block transforms (``BLOCK_TRANSFORM_KEYS``) into a rotated model, in place; the
    function it computes does not change."""
    check_block_transforms(model, layout, transforms)
    stacked = {key: transforms[key].to(model.device, torch.float64) for key in BLOCK_TRANSFORM_KEYS}
    stacked["t_inv_t"] = torch.linalg.inv(stacked[VALUE_KEY]).mT
    for i, block in enumerate(model.blocks):
        for module, name, fn in _block_maps(block, layout, lambda key, i=i: stacked[key][i]):
            tensor = getattr(module, name)
            _set(tensor, fn(tensor.detach().double()))


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


def _parametrize(model: Denoiser, layout: RotationLayout, now: dict[str, torch.Tensor], blocks: bool) -> list:
    """Make every weight the learned transforms touch read them from ``now``; returns (module, name) pairs
    to undo. The residual rotation goes first, as ``fold_rotation`` precedes ``fold_block_transforms``."""
    done = []

    def through(module: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        parametrize.register_parametrization(module, name, _Through(fn))
        done.append((module, name))

    readers, writers = residual_linears(model, layout)
    for linear in readers:
        through(linear, "weight", lambda w: w @ now[ROTATION_KEY].to(w.dtype))
    for linear in writers:
        through(linear, "weight", lambda w: now[ROTATION_KEY].T.to(w.dtype) @ w)
        if linear.bias is not None:  # a reader's bias lives on its output side
            through(linear, "bias", lambda b: now[ROTATION_KEY].T.to(b.dtype) @ b)
    if not blocks:
        return done
    for i, block in enumerate(model.blocks):
        for module, name, fn in _block_maps(block, layout, lambda key, i=i: now[key][i]):
            through(module, name, fn)
    return done


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
    (``ROTATION_KEY``, ``BLOCK_TRANSFORM_KEYS``). The model is left unchanged.

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
    device = model.device
    contexts = [model.block_context(t) for t in tokens]
    with torch.no_grad():
        targets = []  # the full-precision final hidden states, before any quantization hook
        for t, ctx in zip(tokens, contexts, strict=True):
            hidden = model.embed(t)
            for block in model.blocks:
                hidden = run_block_sliced(model, block, hidden, ctx)
            targets.append(hidden)

    learned = _Learned(model, layout, block_transforms)
    now = {key: value.detach() for key, value in learned.current().items()}
    parametrized = _parametrize(model, layout, now, block_transforms)

    def quantize_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (fake_quant_activation(args[0], act, ste=True),)

    names = [name for group in model.linear_groups() for name in group]
    optimizer = torch.optim.Adam(learned.parameters(), lr=lr)
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
                now.update(learned.current())
                r = now[ROTATION_KEY].to(model.dtype)
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
        for module, name in reversed(parametrized):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return learned.result()
