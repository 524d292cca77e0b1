"""schedule.json: the denoising loop unrolled into data, written next to model.onnx.

It holds everything a driver needs besides the denoiser: the mask and EOS ids, the logit shift, the
sampler settings and the table of (step, block, tokens to commit). The table does not depend on the
prompt length (block bounds are offsets into the generated region), so one file serves any prompt.
On reading, the table is checked against a fresh plan of the recorded settings: a hand-edited or
stale file is an error, not a silently different decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from faircalib.errors import CheckpointError, ConfigError
from faircalib.files import write_json_atomic
from faircalib.models.base import DenoiserSpec
from faircalib.models.checkpoint import read_json_object
from faircalib.sampling import Sampling, Schedule, ScheduleStep, plan, sampling_from_json_dict

SCHEDULE_FILE = "schedule.json"
SCHEDULE_FORMAT = 1


@dataclass(frozen=True)
class ExportedSchedule:
    spec: DenoiserSpec
    sampling: Sampling
    table: tuple[ScheduleStep, ...]

    def for_prompt(self, prompt_length: int) -> Schedule:
        return Schedule(prompt_length=prompt_length, gen_length=self.sampling.gen_length, steps=self.table)

    def to_json_dict(self) -> dict[str, Any]:
        sampling = self.sampling.to_json_dict()
        return {
            "format_version": SCHEDULE_FORMAT,
            "family": self.spec.family,
            "mask_token_id": self.spec.mask_token_id,
            "eos_token_ids": list(self.spec.eos_token_ids),
            "vocab_size": self.spec.vocab_size,
            "logit_shift": self.spec.logit_shift,
            "gen_length": self.sampling.gen_length,
            "block_length": self.sampling.block_length,
            "steps": self.sampling.steps,
            "temperature": self.sampling.temperature,
            "sampling": sampling,
            "table": [{"step": i, **asdict(step)} for i, step in enumerate(self.table)],
        }


def exported_schedule(spec: DenoiserSpec, sampling: Sampling) -> ExportedSchedule:
    return ExportedSchedule(spec, sampling, plan(sampling, prompt_length=0).steps)


def write_schedule(directory: str | Path, spec: DenoiserSpec, sampling: Sampling) -> Path:
    path = Path(directory) / SCHEDULE_FILE
    write_json_atomic(path, exported_schedule(spec, sampling).to_json_dict())
    return path


def read_schedule(path: str | Path) -> ExportedSchedule:
    """Read and check a schedule.json (or the one in a bundle directory) field by field: every value in range,
    and the derived ones (the top-level lengths, the step table) equal to what its sampling settings make, so
    a hand-edited or stale file is an error, not a silently different decoder."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {SCHEDULE_FILE} at {path}")
    data = read_json_object(path)
    if data.get("format_version") != SCHEDULE_FORMAT:
        raise CheckpointError(f"{path}: schedule format {data.get('format_version')}, expected {SCHEDULE_FORMAT}")
    try:
        expected = exported_schedule(_spec(data), sampling_from_json_dict(data["sampling"]))
    except KeyError as err:
        raise CheckpointError(f"{path} lacks the field {err.args[0]}") from None
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    for key, value in expected.to_json_dict().items():
        if data.get(key) != value:
            what = "the step table" if key == "table" else f"the field {key} ({data.get(key)})"
            raise CheckpointError(f"{path}: {what} does not match its own sampling settings (edited?)")
    return expected


def _spec(data: dict[str, Any]) -> DenoiserSpec:
    """The denoiser facts of a schedule file, each checked for type and range."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    vocab, mask, eos = data["vocab_size"], data["mask_token_id"], data["eos_token_ids"]
    if not integer(vocab) or vocab < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab}")
    if not integer(mask) or not 0 <= mask < vocab:
        raise ValueError(f"mask_token_id must be a token id below vocab_size {vocab}, got {mask}")
    if not isinstance(eos, list) or not all(integer(t) and 0 <= t < vocab for t in eos):
        raise ValueError(f"eos_token_ids must be a list of token ids below vocab_size {vocab}, got {eos}")
    if not isinstance(data["family"], str) or not isinstance(data["logit_shift"], bool):
        raise ValueError("family must be a string and logit_shift true or false")
    sampler = data["sampling"].get("sampler") if isinstance(data["sampling"], dict) else None
    return DenoiserSpec(data["family"], mask, tuple(eos), vocab, data["logit_shift"], sampler)
