"""QuantArtifact: what a calibration decided, in memory or as a directory.

On disk: ``tensors.safetensors`` (per layer its int codes, 4-bit ones packed two a byte, scales and zero
points; the learned and calibrated full-precision parameters; the position prior) and ``manifest.json``
(format version, config, per-layer activation clip and static peak, model fingerprint, calibration data,
timings). Written through a staging directory and a rename, so a failure never leaves half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from faircalib import __version__
from faircalib.calib.config import QuantConfig
from faircalib.calib.linear import QuantizedLayer, QuantizedWeight
from faircalib.calib.student import apply_quantization
from faircalib.errors import CheckpointError, ConfigError
from faircalib.files import MANIFEST, OWNER_KEY, staged_dir
from faircalib.kernels.int4 import pack_int4, unpack_int4
from faircalib.models.base import Denoiser
from faircalib.models.checkpoint import LazyTensors, read_json_object
from faircalib.sampling import Sampling, sampling_from_json_dict

ARTIFACT_FORMAT = 5  # 5: each layer's weight and activation bits in its record (mixed precision)
READABLE = (4, 5)  # 4: every layer in the config's format
TENSORS = "tensors.safetensors"
FILES = (MANIFEST, TENSORS)

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
    layers: dict[str, QuantizedLayer]  # "blocks.{i}.{name}" -> the layer's record
    fp_params: dict[str, torch.Tensor] = field(default_factory=dict)  # learned transforms, calibrated norm scales
    prior: torch.Tensor | None = None  # FAIR-Calib's position prior [gen_length]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from or saved to

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

    def sampling(self) -> Sampling:
        """The deployment schedule it was calibrated under."""
        recorded = self.manifest.get("sampling")
        if recorded is None:
            raise ConfigError("the artifact records no deployment schedule: pass the decoding settings")
        return sampling_from_json_dict(recorded)

    def apply(self, model: Denoiser, placeholders: bool = False) -> Denoiser:
        """Turn the full-precision ``model`` into this artifact's fake-quant student, in place; returns it.
        ``placeholders``: its quantized linears hold no weights, only their shapes (a student to trace for export)."""
        return apply_quantization(model, self.config, self.layers, self.fp_params, placeholders)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact directory (replacing an earlier artifact there, never anything else unless
        ``overwrite``)."""
        path = Path(path)
        manifest = {
            OWNER_KEY: __version__,
            **{k: v for k, v in self.manifest.items() if k != OWNER_KEY},
            "format_version": ARTIFACT_FORMAT,
            "config": self.config.to_json_dict(),
            "method": self.config.method,
            "format": self.config.format,
            "layers": layer_entries(self.layers),
        }
        with staged_dir(path, FILES, overwrite) as staging:
            save_file(encode_tensors(self.layers, self.fp_params, self.prior), str(staging / TENSORS))
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        self.manifest, self.path = manifest, path
        return path

    @classmethod
    def load(cls, path: str | Path) -> QuantArtifact:
        path = Path(path)
        if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
            raise CheckpointError(f"{path} is not a faircalib artifact (no {MANIFEST} / {TENSORS})")
        manifest = read_json_object(path / MANIFEST)
        version = manifest.get("format_version")
        if version not in READABLE:
            older = isinstance(version, int) and version < min(READABLE)
            raise CheckpointError(
                f"{path} is an artifact of format {version}, this faircalib reads formats {READABLE[0]} to "
                f"{READABLE[-1]}: " + ("calibrate again with this version" if older else "upgrade faircalib to read it")
            )
        config = QuantConfig.from_json_dict(manifest["config"])
        tensors = LazyTensors(path / TENSORS)  # packed codes read and unpacked one layer at a time
        layers = decode_layers(tensors, manifest["layers"], config)
        fp_params = {name[3:]: tensors[name] for name in tensors if name.startswith("fp.")}
        return cls(config, layers, fp_params, tensors.get("prior"), manifest, path)


def layer_entries(layers: dict[str, QuantizedLayer]) -> dict[str, dict[str, Any]]:
    """Each layer's manifest entry: its codes' shape, its weight bits and its activation quantization."""
    return {
        key: {"shape": list(layer.weight.codes.shape), "wbits": layer.weight.spec.bits, "abits": layer.act.bits,
              "clip_ratio": layer.act.clip_ratio, "static_amax": layer.act.static_amax}
        for key, layer in layers.items()
    }  # fmt: skip


def encode_tensors(
    layers: dict[str, QuantizedLayer], fp_params: dict[str, torch.Tensor], prior: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The safetensors content of ``layers`` (codes packed when 4-bit), ``fp_params`` (as "fp.<key>") and the prior."""
    tensors = {f"fp.{key}": v.float().cpu().contiguous() for key, v in fp_params.items()}
    for key, layer in layers.items():
        w = layer.weight
        codes = w.codes.cpu()
        tensors[f"{key}.codes"] = pack_int4(codes) if w.spec.bits == 4 else codes.contiguous()
        tensors[f"{key}.scale"] = w.scale.float().cpu().contiguous()
        if w.zero is not None:
            tensors[f"{key}.zero"] = w.zero.float().cpu().contiguous()
    if prior is not None:
        tensors["prior"] = prior.float().cpu().contiguous()
    return tensors


def decode_layers(
    tensors: Mapping[str, torch.Tensor], entries: dict[str, dict[str, Any]], config: QuantConfig
) -> dict[str, QuantizedLayer]:
    """Inverse of ``encode_tensors`` and ``layer_entries`` for the layers (an entry without bits: the config's)."""
    layers = {}
    for key, entry in entries.items():
        spec = replace(config.weight_spec(), bits=entry.get("wbits", config.wbits))
        act = replace(config.act_spec(), bits=entry.get("abits", config.abits))
        try:
            codes, scale = tensors[f"{key}.codes"], tensors[f"{key}.scale"]
        except KeyError as err:
            raise CheckpointError(f"artifact tensors are missing {err.args[0]}") from None
        if spec.bits == 4:
            codes = unpack_int4(codes, signed=spec.symmetric).to(spec.code_dtype)
        if list(codes.shape) != list(entry["shape"]):
            raise CheckpointError(f"artifact layer {key} has codes {list(codes.shape)}, manifest says {entry['shape']}")
        weight = QuantizedWeight(codes, scale, tensors.get(f"{key}.zero"), spec)
        layer_act = replace(act, clip_ratio=entry["clip_ratio"], static_amax=entry["static_amax"])
        layers[key] = QuantizedLayer(weight, layer_act)
    return layers
