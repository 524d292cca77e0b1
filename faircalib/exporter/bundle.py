"""A deployable bundle: one model file for a runtime (model.onnx, model.gguf), schedule.json, the checkpoint's
tokenizer files and manifest.json, written whole or not at all."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faircalib import __version__
from faircalib.calib.artifact import QuantArtifact, model_fingerprint
from faircalib.calib.student import student_copy
from faircalib.errors import ConfigError
from faircalib.exporter.profiles import Profile, profile
from faircalib.exporter.schedule_file import SCHEDULE_FILE, write_schedule
from faircalib.files import MANIFEST, OWNER_KEY, check_output_dir, staged_dir, write_json_atomic
from faircalib.models.base import Denoiser
from faircalib.sampling import Sampling, default_sampling

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model",
)  # fmt: skip


def bundle_files(*model_files: str) -> tuple[str, ...]:
    """Every file a bundle with these model files may hold (what an earlier export of the same kind left)."""
    return (*model_files, SCHEDULE_FILE, MANIFEST, *TOKENIZER_FILES)


@dataclass(frozen=True)
class Export:
    """What one export is asked for, checked: the profile, the student, the schedule to unroll."""

    prof: Profile
    student: Denoiser
    sampling: Sampling
    made_from: dict[str, Any] | None


def prepare(model: Denoiser, artifact: QuantArtifact | None, profile_name: str, container: str,
            sampling: Sampling | None, consume: bool = False, placeholders: bool = False) -> Export:  # fmt: skip
    """Check ``artifact`` against the profile and ``model``; the student is ``artifact`` applied to a copy of
    ``model`` without the weights it quantizes (to ``model`` itself with ``consume``; the full-precision model
    itself without an artifact), holding placeholders for its quantized weights with ``placeholders`` (see
    ``QuantLinear``); the schedule the one given, else the artifact's, else the family's reference one."""
    prof = profile(profile_name)
    if prof.container != container:
        raise ConfigError(f"profile {prof.name} exports {prof.container.upper()}, not {container.upper()}")
    prof.check(artifact)
    source = model.source
    if artifact is None:
        made_from = {"path": str(source), "fingerprint": model_fingerprint(source) if source else None}
        return Export(prof, model, sampling or default_sampling(model.spec), made_from)
    if source is not None:
        artifact.check_model(source)
    student = artifact.apply(model if consume else student_copy(model), placeholders)
    return Export(prof, student, sampling or artifact.sampling(), artifact.manifest.get("model"))


def write_bundle(
    out: Path, job: Export, artifact: QuantArtifact | None, files: tuple[str, ...], overwrite: bool,
    parity: dict | None, write_model: Callable[[Path], dict[str, Any]],
) -> Path:  # fmt: skip
    """Stage the bundle: ``write_model(staging)`` writes the runtime's model file and returns what the manifest
    says of it; then the schedule, the tokenizer files and the manifest; then the rename into place."""
    check_output_dir(out, files, overwrite)
    source = job.student.source
    with staged_dir(out, files, overwrite) as staging:
        described = write_model(staging)
        write_schedule(staging, job.student.spec, job.sampling)
        for name in TOKENIZER_FILES if source is not None else ():
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, staging / name)
        made = None
        if artifact is not None:
            made = {"method": artifact.config.method, "format": artifact.config.format,
                    "path": str(artifact.path) if artifact.path else None}  # fmt: skip
        write_json_atomic(staging / MANIFEST, {
            OWNER_KEY: __version__, "profile": job.prof.name, "parity": parity, "model": job.made_from,
            "artifact": made, **described,
        })  # fmt: skip
    return out
