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

from faircalib.errors import CheckpointError
from faircalib.models.base import DenoiserSpec
from faircalib.models.checkpoint import read_json_object, write_json_atomic
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
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {SCHEDULE_FILE} at {path}")
    data = read_json_object(path)
    if data.get("format_version") != SCHEDULE_FORMAT:
        raise CheckpointError(f"{path}: schedule format {data.get('format_version')!r}, expected {SCHEDULE_FORMAT}")
    try:
        sampling = sampling_from_json_dict(data["sampling"])
        spec = DenoiserSpec(
            family=data["family"],
            mask_token_id=int(data["mask_token_id"]),
            eos_token_ids=tuple(int(t) for t in data["eos_token_ids"]),
            vocab_size=int(data["vocab_size"]),
            logit_shift=bool(data["logit_shift"]),
            sampler=data["sampling"]["sampler"],
        )
        table = tuple(ScheduleStep(**{k: v for k, v in row.items() if k != "step"}) for row in data["table"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is malformed: {err}") from None
    expected = exported_schedule(spec, sampling)
    if table != expected.table:
        raise CheckpointError(f"{path}: the step table does not match its own sampling settings (edited?)")
    return expected
