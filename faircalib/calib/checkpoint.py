"""The resume directory of a calibration (``OUT.partial/``): everything finished so far, each piece written
whole (temporary file, then rename), so a run killed at any point resumes from its last finished piece.

- ``progress.json``: the run's identity (model fingerprint, config, schedule, data digests), written first;
- ``states.safetensors``: Stage I's calibration states, weights and prior, with its time;
- ``rotation.safetensors``: the learned rotation and block transforms, with their time;
- ``promotion.json``: the linears chosen to stay at 8 bits, with their scores;
- ``block_NNNN.safetensors``: each finished block's layers and full-precision parameters, its report and
  the Stage II time spent up to its end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from faircalib.calib.artifact import decode_layers, encode_tensors, layer_entries
from faircalib.calib.config import QuantConfig
from faircalib.calib.probe import CalibrationSet, ProbeStats, StateChunk
from faircalib.calib.promotion import Promotion
from faircalib.calib.stage2 import BlockReport, Calibrated
from faircalib.errors import ConfigError
from faircalib.files import open_permissions, write_json_atomic
from faircalib.models.checkpoint import read_json_object, read_safetensors

PROGRESS = "progress.json"
STATES = "states.safetensors"
ROTATION = "rotation.safetensors"
PROMOTION = "promotion.json"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(staging), metadata=meta)
    open_permissions(staging)
    os.replace(staging, path)


class Checkpoint:
    """One run's resume directory; ``open`` it before any work, then save each piece as it is finished."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path, self.identity = Path(path), identity

    def open(self) -> bool:
        """Start the directory, or check that it belongs to this very run; True when it holds earlier work."""
        progress = self.path / PROGRESS
        if self.path.exists() and not progress.is_file() and any(self.path.iterdir()):
            raise ConfigError(f"{self.path} is not a resume directory of faircalib (no {PROGRESS}): delete it")
        if progress.is_file():
            if read_json_object(progress).get("identity") != self.identity:
                raise ConfigError(
                    f"{self.path} holds an interrupted run of another model, config, schedule or data: rerun "
                    "that command to resume it, or delete the directory to start this one"
                )
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(progress, {"identity": self.identity})
        return False

    def save_states(self, calib: CalibrationSet, seconds: float) -> None:
        tensors = {}
        for i, chunk in enumerate(calib.chunks):
            tensors[f"chunk{i}.tokens"], tensors[f"chunk{i}.weights"] = chunk.tokens, chunk.weights
        meta = {"description": json.dumps(calib.description), "chunks": str(len(calib.chunks)), "seconds": str(seconds)}
        if calib.stats is not None:
            tensors.update(prior=calib.prior, frontier_hits=calib.stats.frontier_hits,
                           reliability=calib.stats.reliability)  # fmt: skip
            meta["trajectories"] = str(calib.stats.trajectories)
        _save_atomic(tensors, self.path / STATES, meta)

    def load_states(self) -> tuple[CalibrationSet, float] | None:
        if not (self.path / STATES).is_file():
            return None
        tensors, meta = read_safetensors(self.path / STATES)
        chunks = tuple(
            StateChunk(tensors[f"chunk{i}.tokens"], tensors[f"chunk{i}.weights"]) for i in range(int(meta["chunks"]))
        )
        stats = None
        if "prior" in tensors:
            stats = ProbeStats(tensors["frontier_hits"], tensors["reliability"], int(meta["trajectories"]))
        description = json.loads(meta["description"])
        return CalibrationSet(chunks, tensors.get("prior"), stats, description), float(meta["seconds"])

    def save_rotation(self, learned: dict[str, torch.Tensor], seconds: float) -> None:
        _save_atomic(learned, self.path / ROTATION, {"seconds": str(seconds)})

    def save_promotion(self, promotion: Promotion) -> None:
        write_json_atomic(self.path / PROMOTION, promotion.to_json_dict())

    def save_block(self, report: BlockReport, mine: Calibrated, stage2_seconds: float) -> None:
        meta = {"layers": json.dumps(layer_entries(mine.layers)), "report": json.dumps(report.to_json_dict()),
                "stage2_seconds": str(stage2_seconds)}  # fmt: skip
        _save_atomic(encode_tensors(mine.layers, mine.fp_params), self.path / f"block_{report.index:04d}.safetensors",
                     meta)  # fmt: skip

    def load_done(self, cfg: QuantConfig) -> tuple[Calibrated, list[dict], dict[str, float]]:
        """What earlier runs finished (blocks and learned transforms), the finished blocks' reports, their times."""
        done, reports, timings = Calibrated(), [], {}
        if (self.path / ROTATION).is_file():
            learned, meta = read_safetensors(self.path / ROTATION)
            done.fp_params.update(learned)
            timings["rotation_seconds"] = float(meta["seconds"])
        if (self.path / PROMOTION).is_file():
            done.promotion = Promotion.from_json_dict(read_json_object(self.path / PROMOTION))
        for path in sorted(self.path.glob("block_*.safetensors")):
            tensors, meta = read_safetensors(path)
            done.layers.update(decode_layers(tensors, json.loads(meta["layers"]), cfg))
            done.fp_params.update({k[3:]: v for k, v in tensors.items() if k.startswith("fp.")})
            reports.append(json.loads(meta["report"]))
            timings["stage2_seconds"] = float(meta["stage2_seconds"])
        return done, reports, timings
