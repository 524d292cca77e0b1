"""Turning a full-precision model into the fake-quant student of a calibration: the PyTorch reference for what
every exported runtime computes."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from faircalib.calib.config import QuantConfig
from faircalib.calib.learned_rotation import LEARNED_KEYS, fold_learned
from faircalib.calib.linear import QuantizedLayer, install, placeholder
from faircalib.calib.quarot import rotate_model
from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser


def layer_key(block_index: int, name: str) -> str:
    """How a quantized linear is keyed in artifacts: "blocks.{i}.{name relative to the block}"."""
    return f"blocks.{block_index}.{name}"


def split_layer_key(key: str) -> tuple[int, str]:
    """The inverse of ``layer_key``: "blocks.{i}.{name}" -> (i, name)."""
    index, _, name = key.removeprefix("blocks.").partition(".")
    return int(index), name


def linear_names(model: Denoiser) -> list[str]:
    """Every quantized linear of a block, by name relative to it, group by group."""
    return [name for group in model.linear_groups() for name in group]


def linear_widths(model: Denoiser) -> list[int]:
    """The input width of every quantized linear of a block (what a group size must divide)."""
    return [model.blocks[0].get_submodule(name).in_features for name in linear_names(model)]


def student_copy(model: Denoiser) -> Denoiser:
    """A copy of ``model`` to turn into a student, holding placeholders for the weights of the linears the
    student quantizes: its quantized layers replace them, so copying them would only cost memory."""
    memo = {}
    for block in model.blocks:
        for name in linear_names(model):
            weight = block.get_submodule(name).weight
            memo[id(weight)] = nn.Parameter(placeholder(weight), requires_grad=False)
    return copy.deepcopy(model, memo)


def set_fp_params(block: nn.Module, index: int, params: Mapping[str, torch.Tensor]) -> None:
    """Copy full-precision parameters recorded under "blocks.{index}.<name>" into ``block``."""
    prefix = f"blocks.{index}."
    for key, value in params.items():
        if key.startswith(prefix):
            target = block.get_parameter(key[len(prefix) :])
            target.data.copy_(value.to(device=target.device, dtype=target.dtype))


def apply_quantization(
    model: Denoiser,
    cfg: QuantConfig,
    layers: Mapping[str, QuantizedLayer],
    fp_params: Mapping[str, torch.Tensor],
    placeholders: bool = False,
) -> Denoiser:
    """Turn ``model`` into the student in place: rotated as it was at calibration, the learned transforms and
    calibrated full-precision parameters restored, every linear replaced by its quantized layer (holding
    placeholders for its weights with ``placeholders``: a student to trace for export)."""
    learned = {k: v for k, v in fp_params.items() if k in LEARNED_KEYS}
    if cfg.rotate:
        rotate_model(model, cfg.seed)
        fold_learned(model, learned)
    elif learned:
        raise ConfigError("the artifact holds a learned rotation, but its config does not rotate")
    for index, block in enumerate(model.blocks):
        set_fp_params(block, index, fp_params)
        for name in linear_names(model):
            key = layer_key(index, name)
            if key not in layers:
                raise ConfigError(f"the artifact has no weights for {key}")
            install(block, name, layers[key], model.dtype, placeholders)
    return model
