"""Parity of a calibrated student against its full-precision teacher: what `faircalib parity` and the
benchmark report."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm import tqdm

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.pipeline import apply_quantization
from faircalib.models.base import Denoiser
from faircalib.sampling import Denoise, Sampling
from faircalib.sampling.metrics import evaluate_parity, masked_nll, teacher_post_commit_mismatch, teacher_runs


def fake_quant_student(teacher: Denoiser, artifact: QuantArtifact) -> Denoiser:
    """A copy of ``teacher`` running the artifact's weights and activation quantization."""
    return apply_quantization(
        copy.deepcopy(teacher), artifact.weights, artifact.config, artifact.act_clips, artifact.fp_params,
        artifact.act_ranges,
    )  # fmt: skip


@torch.no_grad()
def parity_report(
    teacher: Denoiser,
    student: Denoise,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    nll_windows: torch.Tensor | None = None,
    batch_size: int = 16,
    quiet: bool = True,
    references: list | None = None,
    nll_fp: float | None = None,
    post_commit_probes: int = 4,
    teacher_post_commit: float | None = None,
) -> dict:
    """Every metric of DESIGN.md section 5 for ``student`` (any denoise callable: a fake-quant model, an
    ONNX Runtime or TensorRT backend) against ``teacher`` on ``prompts``.

    ``references`` (from ``teacher_runs``), ``nll_fp`` and ``teacher_post_commit`` skip recomputing the
    teacher's side when many students are compared with one teacher. ``post_commit_mismatch_teacher`` is
    the teacher's own level of both post-commit metrics, the one a faithful student lands at.
    ``post_commit_probes`` trades time for noise in all three (see ``post_commit_counts``).
    """
    if references is None:
        references = teacher_runs(
            teacher, [list(p) for p in prompts], sampling, teacher.spec, batch_size=batch_size, device=teacher.device
        )
    with tqdm(total=len(prompts), desc="parity", unit="prompt", disable=quiet) as bar:
        tally = evaluate_parity(
            student, references, sampling, teacher.spec, on_batch=bar.update, post_commit_probes=post_commit_probes
        )
    report = tally.summary()
    if teacher_post_commit is None:
        teacher_post_commit = teacher_post_commit_mismatch(
            teacher, references, sampling, teacher.spec, probes=post_commit_probes
        )
    report["post_commit_mismatch_teacher"] = teacher_post_commit
    if nll_windows is not None:
        windows = nll_windows.to(teacher.device)
        report["masked_nll_fp"] = nll_fp if nll_fp is not None else masked_nll(teacher, windows, teacher.spec)
        report["masked_nll_q"] = masked_nll(student, windows, teacher.spec)
    report["sampling"] = sampling.to_json_dict()
    return report
