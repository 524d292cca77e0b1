"""Per-step latency of one denoiser forward on a backend: what an unmasking loop pays every step."""

from __future__ import annotations

import statistics
import time

import torch

from faircalib.sampling import Denoise


def step_latency(backend: Denoise, batch: int, seq: int, vocab: int, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Median and 90th-percentile wall time (ms) of backend(input_ids [batch, seq]) on fixed random ids."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        backend(ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend(ids)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "batch": batch,
        "seq": seq,
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "repeats": repeats,
    }
