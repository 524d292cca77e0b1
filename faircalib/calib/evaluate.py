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
from faircalib.sampling import Sampling
from faircalib.sampling.metrics import evaluate_parity, masked_nll


def fake_quant_student(teacher: Denoiser, artifact: QuantArtifact) -> Denoiser:
    """A copy of ``teacher`` running the artifact's weights and activation quantization."""
    return apply_quantization(
        copy.deepcopy(teacher), artifact.weights, artifact.config, artifact.act_clips, artifact.fp_params
    )


@torch.no_grad()
def parity_report(
    teacher: Denoiser,
    student: Denoiser,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    nll_windows: torch.Tensor | None = None,
    batch_size: int = 16,
    quiet: bool = True,
) -> dict:
    """Every metric of DESIGN.md section 5 for ``student`` against ``teacher`` on ``prompts``."""
    with tqdm(total=len(prompts), desc="parity", unit="prompt", disable=quiet) as bar:
        tally = evaluate_parity(
            teacher, student, [list(p) for p in prompts], sampling, teacher.spec,
            batch_size=batch_size, device=teacher.device, on_batch=bar.update,
        )  # fmt: skip
    report = tally.summary()
    if nll_windows is not None:
        windows = nll_windows.to(teacher.device)
        report["masked_nll_fp"] = masked_nll(teacher, windows, teacher.spec)
        report["masked_nll_q"] = masked_nll(student, windows, student.spec)
    report["sampling"] = sampling.to_json_dict()
    return report
