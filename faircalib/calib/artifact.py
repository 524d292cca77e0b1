"""QuantArtifact: a directory with ``tensors.safetensors`` (int codes, 4-bit ones packed two a byte,
scales, zero-points, the position prior) and ``manifest.json`` (format version, config, method, model
fingerprint, calibration data, timings). Written through a temporary directory and a rename, so an
interrupted run never leaves half an artifact behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from faircalib.calib.config import QuantConfig
from faircalib.calib.linear import QuantizedWeight
from faircalib.calib.quant import pack_int4, unpack_int4
from faircalib.errors import CheckpointError, ConfigError
from faircalib.models.checkpoint import read_json_object, read_safetensors

# 2: a learned residual rotation may travel among the full-precision params; 3: learned block transforms too
ARTIFACT_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of config.json, every safetensors header (names, dtypes, shapes) and 16 evenly spaced
    64 KiB samples of each file's tensor data.

    Reads about 1 MB a shard, yet tells apart checkpoints of one architecture (LLaDA-8B-Base and
    -Instruct share config and headers); independent of the dtype the model is loaded in.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            digest.update(path.name.encode() + handle.read(size))
            data_start, data_end = 8 + size, path.stat().st_size
            span = max(0, data_end - data_start - _SAMPLE_BYTES)
            for i in range(_SAMPLES):
                handle.seek(data_start + span * i // max(1, _SAMPLES - 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


@dataclass
class QuantArtifact:
    config: QuantConfig
    weights: dict[str, QuantizedWeight]
    act_clips: dict[str, float] = field(default_factory=dict)
    prior: torch.Tensor | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    fp_params: dict[str, torch.Tensor] = field(default_factory=dict)  # calibrated non-quantized params
    act_ranges: dict[str, float] = field(default_factory=dict)  # static activation peaks (a_static)

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("model", {}).get("fingerprint")

    def check_model(self, model_dir: str | Path) -> None:
        """Raise if this artifact was calibrated for a different checkpoint."""
        found = model_fingerprint(model_dir)
        if self.fingerprint is not None and found != self.fingerprint:
            made_for = self.manifest.get("model", {}).get("path", "another model")
            raise ConfigError(
                f"this artifact was calibrated for {made_for} (fingerprint {self.fingerprint[:12]}), "
                f"not for {model_dir} ({found[:12]})"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            save_file(encode_weights(self.weights, self.prior, self.fp_params), str(staging / TENSORS))
            manifest = {
                **self.manifest,
                "format_version": ARTIFACT_FORMAT,
                "config": self.config.to_json_dict(),
                "method": self.config.method,
                "format": self.config.format,
                "act_clips": self.act_clips,
                "act_ranges": self.act_ranges,
                "layers": {k: list(w.codes.shape) for k, w in self.weights.items()},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            replace_dir(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.manifest = manifest
        return path

    @classmethod
    def load(cls, path: str | Path) -> QuantArtifact:
        path = Path(path)
        if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
            raise CheckpointError(f"{path} is not a faircalib artifact (no {MANIFEST} / {TENSORS})")
        manifest = read_json_object(path / MANIFEST)
        version = manifest.get("format_version")
        if version not in READABLE_FORMATS:
            raise CheckpointError(f"{path}: artifact format {version!r}, this faircalib reads {READABLE_FORMATS}")
        config = QuantConfig.from_json_dict(manifest["config"])
        tensors, _ = read_safetensors(path / TENSORS)
        weights, prior, fp_params = decode_weights(tensors, manifest["layers"], config)
        return cls(
            config, weights, manifest.get("act_clips", {}), prior, manifest, fp_params, manifest.get("act_ranges", {})
        )


def encode_weights(
    weights: dict[str, QuantizedWeight],
    prior: torch.Tensor | None = None,
    fp_params: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {
        f"fp.{key}": v.float().cpu().contiguous() for key, v in (fp_params or {}).items()
    }
    for key, w in weights.items():
        codes = w.codes.cpu()
        tensors[f"{key}.codes"] = pack_int4(codes) if w.spec.bits == 4 else codes.contiguous()
        tensors[f"{key}.scale"] = w.scale.float().cpu().contiguous()
        if w.zero is not None:
            tensors[f"{key}.zero"] = w.zero.float().cpu().contiguous()
    if prior is not None:
        tensors["prior"] = prior.float().cpu().contiguous()
    return tensors


def decode_weights(
    tensors: dict[str, torch.Tensor], layers: dict[str, list[int]], config: QuantConfig
) -> tuple[dict[str, QuantizedWeight], torch.Tensor | None, dict[str, torch.Tensor]]:
    """Inverse of ``encode_weights``: (weights, prior, full-precision params)."""
    spec = config.weight_spec()
    weights = {}
    for key, shape in layers.items():
        try:
            codes = tensors[f"{key}.codes"]
            scale = tensors[f"{key}.scale"]
        except KeyError as err:
            raise CheckpointError(f"artifact tensors are missing {err.args[0]}") from None
        if spec.bits == 4:
            codes = unpack_int4(codes, signed=spec.symmetric).to(spec.code_dtype)
        if list(codes.shape) != list(shape):
            raise CheckpointError(f"artifact layer {key} has codes {list(codes.shape)}, manifest says {shape}")
        weights[key] = QuantizedWeight(codes, scale, tensors.get(f"{key}.zero"), spec)
    fp_params = {name[3:]: value for name, value in tensors.items() if name.startswith("fp.")}
    return weights, tensors.get("prior"), fp_params


def replace_dir(staging: Path, path: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out and removed after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
