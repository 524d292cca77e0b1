"""What a user waits for each denoising step: one forward of the denoiser and the decision the sampler takes
from it, timed on any backend, with peak memory."""

from __future__ import annotations

import statistics
import time

import torch

from faircalib.calib.runner import host_peak_mb
from faircalib.sampling import Denoise


def decision_step(backend: Denoise, ids: torch.Tensor, block_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: the forward over ids [B, L], then the confidence and token of each of the last
    ``block_length`` positions (the block being decoded, all a low-confidence sampler reads), on the host.

    Backends that keep logits on their device (``logits``) decide there: only [B, block_length] pairs cross
    to the host, never the full vocabulary."""
    logits = backend.logits(ids) if hasattr(backend, "logits") else backend(ids)
    confidence, tokens = logits[:, -block_length:].float().softmax(-1).max(-1)
    return confidence.cpu(), tokens.cpu()


def step_latency(
    backend: Denoise, batch: int, seq: int, block_length: int, vocab: int, *, warmup: int = 3, repeats: int = 20
) -> dict:
    """Median and 90th-percentile wall time (ms) of ``decision_step`` on fixed random ids [batch, seq], with the
    peak device memory during the timed steps (CUDA) and the process's host peak so far."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    device = getattr(getattr(backend, "model", None), "device", torch.device("cpu"))
    for _ in range(warmup):
        decision_step(backend, ids, block_length)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decision_step(backend, ids, block_length)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    row = {
        "batch": batch,
        "seq": seq,
        "block_length": block_length,
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "repeats": repeats,
        "host_peak_mb": host_peak_mb(),
    }
    if device.type == "cuda":
        row["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row
