"""A calibration end to end: Stage I probe -> calibration states -> Stage II -> QuantArtifact.

``quantize`` works in memory; given a checkpoint directory it saves every finished piece there and resumes
from it (the CLI's ``OUT.partial/``), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from faircalib.calib.artifact import QuantArtifact, model_fingerprint
from faircalib.calib.checkpoint import Checkpoint
from faircalib.calib.config import QuantConfig
from faircalib.calib.learned_rotation import ROTATION_KEY
from faircalib.calib.probe import CalibrationSet, teacher_states, text_states
from faircalib.calib.promotion import Promotion
from faircalib.calib.stage2 import BlockReport, Calibrated, Events, calibrate
from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser
from faircalib.progress import progress
from faircalib.sampling import Sampling, record_runs


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def checkpoint_bytes(model_dir: str | Path) -> int:
    """The size of a checkpoint's weight files (at least 1: a ratio to it is always defined)."""
    return max(1, sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors")))


def host_peak_mb() -> float:
    """This process's resident-set high-water mark, in MiB.

    On Linux that is VmHWM of /proc/self/status, not getrusage's ru_maxrss: the kernel carries the
    pre-exec image's peak into ru_maxrss, so a process started from a large parent would report the parent's.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def take_gpu_peak(device: torch.device, peaks: dict[str, float], stage: str) -> None:
    """Record the GPU's peak allocation since the last stage under ``stage`` and start counting afresh: Stage I
    and the rotation hold the whole model on the GPU, the blocks one at a time, so one peak would hide both."""
    if device.type == "cuda":
        peaks[stage] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)


def check_inputs(model: Denoiser, cfg: QuantConfig, prompts: Sequence[Sequence[int]], text_windows) -> None:
    """Fail before any work: missing data, or linears whose input width does not split into the groups."""
    if cfg.states == "text" and text_windows is None:
        raise ConfigError(f"method {cfg.method} calibrates on plain text: no text windows were given")
    if not prompts:
        raise ConfigError("no calibration prompts")
    spec = cfg.weight_spec()
    for name in (n for group in model.linear_groups() for n in group):
        spec.groups(model.blocks[0].get_submodule(name).in_features)


def quantize(
    model: Denoiser,
    cfg: QuantConfig,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    text_windows: torch.Tensor | None = None,
    checkpoint: str | Path | None = None,
    data_description: dict | None = None,
    quiet: bool = True,
) -> QuantArtifact:
    """Calibrate ``model`` in place (it becomes the fake-quant student) and return the artifact.

    ``prompts``: token ids of the calibration prompts, decoded by the teacher under ``sampling`` (the
    deployment schedule); ``text_windows`` [N, L] for methods that calibrate on plain text. Off the CPU,
    Stage I and the rotation run the whole model on its device; then the blocks move to the CPU and come back
    one at a time (``calibrate``'s ``offload``), and stay on the CPU afterwards.
    """
    check_inputs(model, cfg, prompts, text_windows)
    source = getattr(model, "source", None)
    fingerprint = model_fingerprint(source) if source is not None else None
    identity = {
        "fingerprint": fingerprint, "config": cfg.to_json_dict(), "sampling": sampling.to_json_dict(),
        "prompts": _digest([list(p) for p in prompts]),
        "text": _digest(text_windows.tolist()) if text_windows is not None else None,
    }  # fmt: skip
    saved = Checkpoint(Path(checkpoint), identity) if checkpoint is not None else None
    if saved is not None and saved.open() and not quiet:
        print(f"resuming the interrupted run in {saved.path}", flush=True)
    peaks: dict[str, float] = {}
    calib, timings = stage_one(model, cfg, sampling, prompts, text_windows, saved, quiet)
    take_gpu_peak(model.device, peaks, "stage1")
    done, reports, earlier = saved.load_done(cfg) if saved is not None else (Calibrated(), [], {})
    timings.update(earlier)
    result = stage_two(model, cfg, calib, done, reports, timings, peaks, saved, quiet)
    host_peak = host_peak_mb()
    manifest = {
        "model": {"path": str(source) if source else None, "fingerprint": fingerprint, "family": model.spec.family},
        "sampling": sampling.to_json_dict(),
        "calibration_data": {**calib.description, **(data_description or {})},
        "timings": timings,
        # the GPU's on a GPU (where host memory is not what runs out), else the host's
        "peak_memory_mb": max(peaks.values()) if peaks else host_peak,
        "gpu_peak_mb_by_stage": peaks,
        "host_peak_mb": host_peak,
        "host_peak_over_checkpoint": host_peak * 2**20 / checkpoint_bytes(source) if source else None,
        "blocks": reports,
    }
    if result.promotion is not None:
        manifest["promotion"] = result.promotion.to_json_dict()
    return QuantArtifact(cfg, result.layers, result.fp_params, calib.prior, manifest)


def stage_one(
    model: Denoiser, cfg: QuantConfig, sampling: Sampling, prompts: Sequence[Sequence[int]], text_windows,
    saved: Checkpoint | None, quiet: bool,
) -> tuple[CalibrationSet, dict[str, float]]:  # fmt: skip
    """The calibration states: from the checkpoint when an earlier run got that far, else the teacher's
    trajectories under the deployment schedule (or the text windows), checkpointed."""
    earlier = saved.load_states() if saved is not None else None
    if earlier is not None:
        return earlier[0], {"stage1_seconds": earlier[1]}
    start = time.perf_counter()
    if cfg.states == "text":
        calib = text_states(text_windows)
    else:
        with progress(len(prompts), "stage I: teacher probe", "prompt", quiet, fractional=True) as bar:
            runs = record_runs(model, prompts, sampling, model.spec, device=model.device, on_progress=bar.update)
        calib = teacher_states([run for _, run in runs], cfg, sampling, model.spec.mask_token_id)
    seconds = time.perf_counter() - start
    if saved is not None:
        saved.save_states(calib, seconds)
    return calib, {"stage1_seconds": seconds}


def stage_two(
    model: Denoiser, cfg: QuantConfig, calib: CalibrationSet, done: Calibrated, reports: list[dict],
    timings: dict[str, float], peaks: dict[str, float], saved: Checkpoint | None, quiet: bool,
) -> Calibrated:  # fmt: skip
    """Stage II with its progress bars (rotation steps, then blocks, each with its own clock) and checkpoints;
    ``reports`` and ``timings`` are brought up to date."""
    compute = model.device  # the embedding's, where calibration computes: blocks may wait on the CPU
    learning = cfg.rotation_steps > 0 and ROTATION_KEY not in done.fp_params
    rotation_bar = progress(cfg.rotation_steps, "stage II: rotation", "step", quiet or not learning)
    blocks_bar = None
    before, start = timings.get("stage2_seconds", 0.0), time.perf_counter()

    def rotation_learned(learned: dict[str, torch.Tensor]) -> None:
        timings["rotation_seconds"] = time.perf_counter() - start
        if saved is not None:
            saved.save_rotation(learned, timings["rotation_seconds"])

    def streaming() -> None:
        nonlocal blocks_bar
        rotation_bar.close()
        take_gpu_peak(compute, peaks, "whole_model")
        blocks_bar = progress(len(model.blocks), "stage II: blocks", "block", quiet)
        blocks_bar.update(len(reports))

    def block_done(report: BlockReport, mine: Calibrated) -> None:
        if report.resumed:
            return
        reports.append(report.to_json_dict())
        timings["stage2_seconds"] = before + time.perf_counter() - start
        if saved is not None:
            saved.save_block(report, mine, timings["stage2_seconds"])
        blocks_bar.update(1)

    def promoted(promotion: Promotion) -> None:
        if saved is not None:
            saved.save_promotion(promotion)
        if not quiet:
            print(f"promoted to 8 bits ({promotion.by}, {promotion.budget:g} % budget): "
                  f"{', '.join(promotion.promoted) or 'none'}", flush=True)  # fmt: skip

    events = Events(rotation_step=rotation_bar.update, rotation_learned=rotation_learned, promoted=promoted,
                    streaming=streaming, block_done=block_done)  # fmt: skip
    try:
        result = calibrate(model, calib, cfg, done=done, events=events,
                           offload="cpu" if compute.type != "cpu" else None)  # fmt: skip
    finally:
        rotation_bar.close()
        if blocks_bar is not None:
            blocks_bar.close()
    timings["stage2_seconds"] = before + time.perf_counter() - start
    take_gpu_peak(compute, peaks, "blocks")
    return result
