"""Per-block transforms learned with the rotation (OmniQuant's and FlatQuant's idea, restricted to what folds
exactly into the weights): an invertible T_k = R_k diag(e^c_k) per value head, V_k T_k, whose inverse the
attention output projection's input columns absorb (attention mixes tokens linearly within a head); a
per-channel scale s on each norm's output, norm weight / s and readers' columns times s; and one on the FFN's
linear branch, up rows / s, the down projection's input columns times s before the online Hadamard. They
change what each 4-bit activation quantizer sees, not what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from faircalib.calib.quarot import set_value
from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import OnlineHadamard
from faircalib.models.base import Denoiser, RotationLayout
from faircalib.models.streaming import visiting

VALUE_KEY = "value_transform"  # [blocks, value heads, head dim, head dim]: T per value head
NORM_SCALE_KEY = "norm_scale"  # [blocks, norms, D]: the readers' column scales s (norm weight / s)
FFN_SCALE_KEY = "ffn_scale"  # [blocks, F]: the down projection's input column scales s (up rows / s)
BLOCK_TRANSFORM_KEYS = (VALUE_KEY, NORM_SCALE_KEY, FFN_SCALE_KEY)


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


def block_maps(
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
        with visiting(block, model.device):  # blocks may wait on the CPU
            for module, name, fn in block_maps(block, layout, lambda key, i=i: stacked[key][i]):
                set_value(getattr(module, name), fn)
