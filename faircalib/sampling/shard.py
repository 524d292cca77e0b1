"""Work sharded over the processes of a ``torch.distributed`` group (started by torchrun; gloo on CPUs, NCCL on
GPUs): each process runs every world-th batch, and the results are gathered in batch order, so any number of
processes returns exactly what one does. Without a group everything runs here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mine(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every world-th one from its rank."""
    rank, size = world()
    return list(items[rank::size])


def gathered(local: list[T]) -> list[T]:
    """Every process's results of ``mine(items)``, back in the order of ``items`` (on every process)."""
    rank, size = world()
    if size == 1:
        return local
    parts: list[list[T] | None] = [None] * size
    dist.all_gather_object(parts, local)
    rounds = max(len(part) for part in parts)
    return [part[i] for i in range(rounds) for part in parts if i < len(part)]
