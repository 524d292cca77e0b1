"""Blocks streamed from the CPU: a model larger than its device keeps its blocks in host memory and brings each
one to the device only while it computes; the embedding and the head stay on the device.

``stream_blocks`` hooks every block: a block that waits on the CPU when it is called is copied to the device
for that call and dropped from it after, so every loop over ``model.blocks`` that goes through
``Denoiser.run_block`` streams (Stage I, the learned rotation, promotion, parity). A loop that puts a block on
the device itself (Stage II, one block at a time) finds it there and nothing moves. Loops that change weights
in place without running the block take it to the device with ``visiting``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from faircalib.models.base import Denoiser

HOST = torch.device("cpu")
_VISITING = "_faircalib_visiting"  # set on a block while a call brought it to the device
_RESIDENT = "_faircalib_resident"  # set on a block a loop keeps where it is (``resident``)
_STREAMED = "_faircalib_streamed"  # set on every block ``stream_blocks`` hooked


def home_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def is_streamed(model: Denoiser) -> bool:
    """Whether ``model``'s blocks stream (``stream_blocks``), even where the device is the host."""
    return any(getattr(block, _STREAMED, False) for block in model.blocks)


@contextmanager
def visiting(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``block`` on ``device`` inside the context, back where it was after (nothing moves when it is there)."""
    home = home_of(block)
    if home == device:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


@contextmanager
def resident(block: nn.Module) -> Iterator[nn.Module]:
    """Inside the context the block's calls leave it where it is: a loop that places a block itself and learns
    parameters in it (Stage II) must keep the same parameter objects from call to call."""
    setattr(block, _RESIDENT, True)
    try:
        yield block
    finally:
        setattr(block, _RESIDENT, False)


def _copy_to(block: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer of ``block`` a new tensor on ``device``. New parameter objects, not new
    data in the old ones: autograd may hold the old ones for a backward pass still to come."""
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(param.detach().to(device), param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _arrive(device: torch.device):
    # On a CPU-only run the copies are new parameter objects over the same storage: nothing is copied, and the
    # path a GPU run takes is the one the tests take.
    def hook(block: nn.Module, _args) -> None:
        if home_of(block) == HOST and not getattr(block, _VISITING, False) and not getattr(block, _RESIDENT, False):
            _copy_to(block, device)
            setattr(block, _VISITING, True)

    return hook


def _leave(block: nn.Module, _args, _output) -> None:
    if getattr(block, _VISITING, False):
        _copy_to(block, HOST)
        setattr(block, _VISITING, False)


def stream_blocks(model: Denoiser, device: torch.device | str) -> Denoiser:
    """Put ``model``'s blocks on the CPU and everything else on ``device``, and hook every block to visit
    ``device`` for each call that finds it on the CPU; returns the model."""
    device = torch.device(device)
    inside = {id(module) for block in model.blocks for module in block.modules()}
    for block in model.blocks:
        block.to(HOST)
        block.register_forward_pre_hook(_arrive(device))
        block.register_forward_hook(_leave)
        setattr(block, _STREAMED, True)
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model
