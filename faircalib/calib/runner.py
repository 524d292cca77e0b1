"""`faircalib calibrate` end to end: Stage I probe -> calibration states -> Stage II -> QuantArtifact.

Progress survives interruption: the calibration states and every finished block are checkpointed in
``OUT.partial/`` (with the learned rotation, when there is one) and a rerun with the same model, config,
schedule and prompts resumes from the last finished block. The artifact itself appears only when
everything is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from faircalib import __version__
from faircalib.calib.artifact import QuantArtifact, decode_weights, encode_weights, model_fingerprint
from faircalib.calib.config import QuantConfig
from faircalib.calib.pipeline import ROTATION_KEY, BlockReport, CalibrationResult, calibrate, check_shapes
from faircalib.calib.probe import ProbeStats
from faircalib.calib.states import CalibrationSet, StateChunk, probe_teacher, teacher_states, text_states
from faircalib.errors import ConfigError
from faircalib.models import Denoiser, load_denoiser
from faircalib.models.checkpoint import read_safetensors, write_json_atomic
from faircalib.sampling import Sampling


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def host_peak_mb() -> float:
    """This process's resident-set high-water mark, in MiB.

    On Linux that is VmHWM of /proc/self/status, not getrusage's ru_maxrss: the kernel carries the
    pre-exec image's peak into ru_maxrss, so a process started from a large parent (the benchmark, holding
    its evaluation references) would report the parent's size.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def take_gpu_peak(device: torch.device, peaks: dict[str, float], stage: str) -> None:
    """Record the GPU's peak allocation since the last stage under ``stage`` and start counting afresh: Stage I
    and the start of Stage II (the rotation) hold the whole model on the GPU, the blocks one at a time, so one
    overall peak would hide what each needs."""
    if device.type == "cuda":
        peaks[stage] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)


def save_calibration_set(calib: CalibrationSet, path: Path) -> None:
    tensors = {}
    for i, chunk in enumerate(calib.chunks):
        tensors[f"chunk{i}.tokens"] = chunk.tokens.cpu().contiguous()
        tensors[f"chunk{i}.weights"] = chunk.weights.cpu().contiguous()
    if calib.prior is not None:
        tensors["prior"] = calib.prior.cpu().contiguous()
        tensors["frontier_hits"] = calib.stats.frontier_hits.cpu().contiguous()
        tensors["reliability"] = calib.stats.reliability.cpu().contiguous()
    meta = {"description": json.dumps(calib.description), "chunks": str(len(calib.chunks))}
    if calib.stats is not None:
        meta["trajectories"] = str(calib.stats.trajectories)
    save_file(tensors, str(path), metadata=meta)


def load_calibration_set(path: Path) -> CalibrationSet:
    tensors, meta = read_safetensors(path)
    chunks = tuple(
        StateChunk(tensors[f"chunk{i}.tokens"], tensors[f"chunk{i}.weights"]) for i in range(int(meta["chunks"]))
    )
    stats = None
    if "prior" in tensors:
        stats = ProbeStats(tensors["frontier_hits"], tensors["reliability"], int(meta["trajectories"]))
    return CalibrationSet(chunks, tensors.get("prior"), stats, json.loads(meta["description"]))


def run_calibration(
    model_dir: str | Path,
    cfg: QuantConfig,
    sampling: Sampling,
    prompts: Sequence[Sequence[int]],
    out: str | Path,
    *,
    text_windows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    data_description: dict | None = None,
    quiet: bool = False,
    model: Denoiser | None = None,
) -> QuantArtifact:
    """``model``: the checkpoint at ``model_dir`` already loaded (it is quantized in place); loaded here
    otherwise. Off the CPU, Stage I and the rotation run the whole model on its device; then its blocks move
    to the CPU and come back one at a time to be calibrated (``calibrate``'s ``offload``), and they stay on the
    CPU afterwards."""
    model_dir, out = Path(model_dir), Path(out)
    if cfg.states == "text" and text_windows is None:
        raise ConfigError(f"method {cfg.method} calibrates on plain text: no text windows were given")
    if not prompts:
        raise ConfigError("no calibration prompts")
    fingerprint = model_fingerprint(model_dir)
    if model is None:
        model = load_denoiser(model_dir, dtype, device)
    check_shapes(model, cfg)
    compute = model.device  # the embedding's, where calibration computes: blocks may wait on the CPU
    identity = {
        "fingerprint": fingerprint,
        "config": cfg.to_json_dict(),
        "sampling": sampling.to_json_dict(),
        "prompts": _digest([list(p) for p in prompts]),
        "text": _digest(text_windows.tolist()) if text_windows is not None else None,
    }
    partial = out.with_name(out.name + ".partial")
    progress_path = partial / "progress.json"
    timings: dict[str, float] = {}
    gpu_peaks: dict[str, float] = {}  # MiB by stage, this process only (a resumed run has no Stage I)
    done, done_clips, done_ranges, done_fp, reports = {}, {}, {}, {}, []

    if partial.exists():
        progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
        if progress.get("identity") != identity:
            raise ConfigError(
                f"{partial} holds an interrupted run with a different model, config or data: "
                "delete it to start over, or rerun with the same arguments to resume"
            )
        calib = load_calibration_set(partial / "states.safetensors")
        timings = progress.get("timings", {})
        for block in sorted(partial.glob("block_*.safetensors")):
            tensors, meta = read_safetensors(block)
            weights, _, fp_params = decode_weights(tensors, json.loads(meta["layers"]), cfg)
            done.update(weights)
            done_fp.update(fp_params)
            done_clips.update(json.loads(meta["clips"]))
            done_ranges.update(json.loads(meta["ranges"]))
        if (partial / "rotation.safetensors").is_file():
            done_fp.update(read_safetensors(partial / "rotation.safetensors")[0])
        reports = progress.get("blocks", [])
        if not quiet:
            print(f"resuming {out}: {len(reports)} block(s) already calibrated", file=sys.stderr)
    else:
        partial.mkdir(parents=True)
        start = time.perf_counter()
        if cfg.states == "text":
            calib = text_states(text_windows)
        else:
            with tqdm(total=len(prompts), desc="stage I: teacher probe", unit="prompt", disable=quiet) as bar:
                runs = probe_teacher(model, prompts, sampling, on_batch=bar.update)
            calib = teacher_states(runs, cfg, sampling, model.spec.mask_token_id)
        timings["stage1_seconds"] = time.perf_counter() - start
        take_gpu_peak(compute, gpu_peaks, "stage1")
        save_calibration_set(calib, partial / "states.safetensors")
        write_json_atomic(progress_path, {"identity": identity, "timings": timings, "blocks": []})

    learning = cfg.rotation_steps > 0 and ROTATION_KEY not in done_fp
    rotation_bar = tqdm(total=cfg.rotation_steps, desc="stage II: rotation", unit="step", disable=quiet or not learning)

    def rotation_done(learned: dict[str, torch.Tensor]) -> None:
        rotation_bar.close()
        timings["rotation_seconds"] = time.perf_counter() - start
        staging = partial / "rotation.safetensors.tmp"  # a kill mid-write must not leave a torn rotation
        save_file({key: value.cpu().contiguous() for key, value in learned.items()}, str(staging))
        os.replace(staging, partial / "rotation.safetensors")

    bar = tqdm(total=len(model.blocks), initial=len(reports), desc="stage II: blocks", unit="block", disable=quiet)
    stage2_before = timings.get("stage2_seconds", 0.0)  # spent by an interrupted run on its finished blocks
    start = time.perf_counter()

    def checkpoint(index: int, result: CalibrationResult, report: BlockReport) -> None:
        if not report.resumed:
            prefix = f"blocks.{index}."
            weights = {k: w for k, w in result.weights.items() if k.startswith(prefix)}
            clips = {k: c for k, c in result.act_clips.items() if k.startswith(prefix)}
            ranges = {k: r for k, r in result.act_ranges.items() if k.startswith(prefix)}
            fp_params = {k: v for k, v in result.fp_params.items() if k.startswith(prefix)}
            layers = {k: list(w.codes.shape) for k, w in weights.items()}
            meta = {"layers": json.dumps(layers), "clips": json.dumps(clips), "ranges": json.dumps(ranges)}
            tensors = encode_weights(weights, fp_params=fp_params)
            save_file(tensors, str(partial / f"block_{index:04d}.safetensors"), metadata=meta)
            reports.append(block_report_dict(report))
            timings["stage2_seconds"] = stage2_before + time.perf_counter() - start
            write_json_atomic(progress_path, {"identity": identity, "timings": timings, "blocks": reports})
            bar.update(1)

    try:
        result = calibrate(
            model, calib, cfg, done=done, done_clips=done_clips, done_ranges=done_ranges, done_fp=done_fp,
            on_block=checkpoint, on_rotation_step=rotation_bar.update, on_rotation=rotation_done,
            offload="cpu" if compute.type != "cpu" else None,
            on_streaming=lambda: take_gpu_peak(compute, gpu_peaks, "whole_model"),
        )  # fmt: skip
    finally:
        rotation_bar.close()
        bar.close()
    timings["stage2_seconds"] = stage2_before + time.perf_counter() - start
    take_gpu_peak(compute, gpu_peaks, "blocks")
    artifact = QuantArtifact(
        config=cfg,
        weights=result.weights,
        act_clips=result.act_clips,
        act_ranges=result.act_ranges,
        prior=calib.prior,
        fp_params=result.fp_params,
        manifest={
            "faircalib_version": __version__,
            "model": {"path": str(model_dir), "fingerprint": fingerprint, "family": model.spec.family},
            "sampling": sampling.to_json_dict(),
            "calibration_data": {**calib.description, **(data_description or {})},
            "timings": timings,
            # the GPU's on a GPU (where host memory is not what runs out), else the host's
            "peak_memory_mb": max(gpu_peaks.values()) if gpu_peaks else host_peak_mb(),
            "gpu_peak_mb_by_stage": gpu_peaks,
            "blocks": reports,
        },
    )
    artifact.save(out)
    shutil.rmtree(partial, ignore_errors=True)
    return artifact


def block_report_dict(report: BlockReport) -> dict:
    out = {"index": report.index, "seconds": round(report.seconds, 3), "gptq_retries": report.gptq_retries}
    out["output_mse"] = report.output_mse
    if report.recon is not None:
        out["recon"] = {"before": report.recon.loss_before, "after": report.recon.loss_after, "kept": report.recon.kept}
    return out
