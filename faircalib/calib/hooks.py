"""Forward hooks on a block's named submodules, for statistics gathered while the calibration states
run through it (Hessians, activation peaks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import nn


@contextmanager
def hooked(block: nn.Module, hooks: Mapping[str, Callable], *, pre: bool) -> Iterator[None]:
    """Each named submodule of ``block`` calls its hook while the context is open: before its forward
    with (module, args) when ``pre``, after it with (module, args, output) otherwise."""
    handles = []
    try:
        for name, hook in hooks.items():
            module = block.get_submodule(name)
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
