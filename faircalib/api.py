"""The public API, in memory with disk optional:

model = faircalib.load_denoiser("faircalib/zoo/llada-wiki-tiny")
artifact = faircalib.quantize(model, faircalib.preset("fair", wbits=4, abits=4), prompts, sampling)
student = artifact.apply(faircalib.load_denoiser(...))
faircalib.parity(model, student, prompts, sampling)
faircalib.export(model, artifact, "ort-w4a4", "runs/bundle")
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from faircalib.calib import artifact as artifact_files
from faircalib.calib import runner
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.exporter.gguf_export import export_gguf
from faircalib.exporter.onnx_export import export_bundle
from faircalib.exporter.profiles import PROFILES
from faircalib.files import check_output_dir
from faircalib.models import Denoiser, load_tokenizer
from faircalib.models.tokenizer import encode_prompt
from faircalib.progress import progress
from faircalib.sampling import Denoise, Sampling, record_runs
from faircalib.sampling.parity import parity_report

Prompts = Sequence[str] | Sequence[Sequence[int]]


def encode_prompts(model: Denoiser, prompts: Prompts) -> list[list[int]]:
    """Token ids of ``prompts``: texts go through the tokenizer of the model's checkpoint, ids pass as they are."""
    if not prompts or not isinstance(prompts[0], str):
        return [list(p) for p in prompts]
    tokenizer = load_tokenizer(model.source) if model.source is not None else None
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: give the prompts as token ids")
    return [encode_prompt(tokenizer, text) for text in prompts]


def quantize(
    model: Denoiser,
    config: QuantConfig,
    prompts: Prompts,
    sampling: Sampling,
    *,
    inplace: bool = False,
    text_windows: torch.Tensor | None = None,
    quiet: bool = True,
) -> QuantArtifact:
    """Calibrate a student of ``model`` for the deployment schedule ``sampling`` and return its artifact.

    ``prompts``: calibration prompts (texts, or token ids). ``model`` is left as it is, unless ``inplace``:
    then it becomes the student itself, which saves a copy of the weights (an 8B model's 16 GB in bf16).
    """
    target = model if inplace else copy.deepcopy(model)
    return runner.quantize(target, config, encode_prompts(model, prompts), sampling, text_windows=text_windows,
                           quiet=quiet)  # fmt: skip


def calibrate_to(
    out: str | Path,
    model: Denoiser,
    config: QuantConfig,
    prompts: Prompts,
    sampling: Sampling,
    *,
    text_windows: torch.Tensor | None = None,
    data_description: dict | None = None,
    overwrite: bool = False,
    quiet: bool = True,
) -> QuantArtifact:
    """``quantize`` ``model`` in place into the artifact directory ``out``, checkpointing every finished piece
    in ``OUT.partial/``: the same call after an interruption resumes where it stopped."""
    out = Path(out)
    check_output_dir(out, artifact_files.FILES, overwrite)
    partial = out.with_name(out.name + ".partial")
    artifact = runner.quantize(
        model, config, encode_prompts(model, prompts), sampling, text_windows=text_windows, checkpoint=partial,
        data_description=data_description, quiet=quiet,
    )  # fmt: skip
    artifact.save(out, overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    return artifact


def export(
    model: Denoiser,
    artifact: QuantArtifact | None,
    profile: str,
    out: str | Path,
    *,
    sampling: Sampling | None = None,
    overwrite: bool = False,
    parity: dict | None = None,
    consume: bool = False,
) -> Path:
    """Write the deployable bundle of ``artifact``'s student of ``model`` for ``profile`` (e.g. "ort-w4a4",
    "trt-w4a16", "gguf-q4_0"; no artifact for "ort-fp32" and "gguf-f16", the full-precision model): model.onnx
    or model.gguf, schedule.json, tokenizer files, manifest (with ``parity``, the summary the student was gated on,
    if given). ``model`` is left as it is, unless ``consume``: the student is then made of it (one copy of the
    checkpoint's weights less in memory) and it is unusable afterwards."""
    writer = export_gguf if PROFILES.get(profile) and PROFILES[profile].container == "gguf" else export_bundle
    return writer(model, artifact, profile, out, sampling=sampling, overwrite=overwrite, parity=parity,
                  consume=consume)  # fmt: skip


def parity(
    teacher: Denoiser,
    student: Denoise,
    prompts: Prompts,
    sampling: Sampling,
    *,
    nll_windows: torch.Tensor | None = None,
    post_commit_probes: int = 4,
    batch_size: int = 16,
    quiet: bool = True,
) -> dict:
    """Decision parity of ``student`` (a fake-quant model, or any runtime backend) against ``teacher`` on
    ``prompts`` under ``sampling``: frontier flips, write error, post-commit mismatch and the rest (see
    docs/DESIGN.md, "Metrics"), with per-step curves."""
    ids = encode_prompts(teacher, prompts)
    with progress(len(ids), "parity: teacher", "prompt", quiet, fractional=True) as bar:
        references = record_runs(teacher, ids, sampling, teacher.spec, batch_size=batch_size, device=teacher.device,
                                 on_progress=bar.update)  # fmt: skip
    with progress(len(ids), "parity: student", "prompt", quiet, fractional=True) as bar:
        return parity_report(
            teacher, student, ids, sampling, teacher.spec, references=references, nll_windows=nll_windows,
            post_commit_probes=post_commit_probes, device=teacher.device, on_progress=bar.update,
        )  # fmt: skip
