"""Reading and writing checkpoint directories: config.json + safetensors (single file or sharded).

Tensors are read one at a time straight into the dtype the caller asks for, so an 8B checkpoint never
exists twice in memory: the model is built on the meta device and each parameter is assigned once. They are
read into memory of their own, not mapped from the file: a mapping lives as long as any tensor of the file, so
the weights an export replaces by their codes would stay resident.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from faircalib.errors import CheckpointError
from faircalib.files import write_json_atomic

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def read_config(model_dir: Path) -> dict[str, Any]:
    """Parse ``model_dir/config.json`` with errors that name the path."""
    if not model_dir.exists():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise CheckpointError(f"expected a model directory, got a file: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: is this a model directory?")
    return read_json_object(config_path)


@dataclass(frozen=True)
class TensorSource:
    """Where each tensor of a safetensors checkpoint lives; nothing is loaded until asked for."""

    files: Mapping[str, Path]  # tensor name -> file

    @classmethod
    def open(cls, model_dir: Path) -> TensorSource:
        index_path = model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is not a safetensors index (no weight_map)") from None
            shards = {name: model_dir / shard for name, shard in weight_map.items()}
            for shard in sorted(set(shards.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index_path.name} points at {shard.name}, which is missing")
            return cls(shards)
        single = model_dir / SINGLE_FILE
        if single.is_file():
            with _open(single) as handle:
                return cls({name: single for name in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
        raise CheckpointError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def shape(self, name: str) -> tuple[int, ...]:
        with _open(self.files[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def load_into(self, model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        """Assign every parameter of ``model`` (built on the meta device) from the checkpoint.

        Raises CheckpointError naming every missing tensor, or the first one whose shape differs.
        Tensors in the checkpoint that the model does not use are ignored.
        """
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.files))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
        loaded: dict[str, torch.Tensor] = {}
        for path, names in _group_by_file({n: self.files[n] for n in expected}).items():
            tensors = LazyTensors(path)
            for name in names:  # shapes first: a mismatch is found before anything is read
                shape, want = tensors.shape(name), tuple(expected[name].shape)
                if shape != want:
                    raise CheckpointError(f"tensor {name} in {path.name} has shape {shape}, the config implies {want}")
            with path.open("rb") as file:
                for name in names:
                    loaded[name] = tensors.read(file, name).to(device=device, dtype=dtype)
        model.load_state_dict(loaded, assign=True)


def _group_by_file(files: Mapping[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name, path in files.items():
        grouped.setdefault(path, []).append(name)
    return grouped


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, and its metadata (empty when it has none)."""
    tensors = LazyTensors(path)
    return dict(tensors.items()), tensors.metadata


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file by name, each read into memory of its own when it is asked for and
    not kept: a reader that turns them into something else one at a time never holds them all."""

    def __init__(self, path: Path):
        with _open(path):  # the header checked, with our errors
            pass
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            self.header: dict[str, Any] = json.loads(file.read(size))
        self.path, self.base = path, 8 + size
        self.metadata: dict[str, str] = self.header.pop("__metadata__", None) or {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        with self.path.open("rb") as file:
            return self.read(file, name)

    def read(self, file: BinaryIO, name: str) -> torch.Tensor:
        """Tensor ``name`` from this file opened as ``file`` (a reader of many shares one handle)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        file.seek(self.base + start)
        if file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start:
            raise CheckpointError(f"{self.path} ends inside tensor {name}: the file is truncated")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own untyped errors on a corrupt header
        raise CheckpointError(f"cannot read {path}: {err}") from None


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write tensors as ``model.safetensors``, or as HF-style shards plus an index when they exceed
    ``max_shard_bytes``. Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    shards = list(_split_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        path = out_dir / SINGLE_FILE
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(out_dir / INDEX_FILE, index)
    return written + [out_dir / INDEX_FILE]


def _split_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and max_bytes is not None and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    yield shard


_REQUIRED = object()


def config_field(config: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """One typed field of a config.json, with an error that names it."""
    if key not in config or config[key] is None:
        if default is _REQUIRED:
            raise CheckpointError(f"config.json is missing the field '{key}'")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"config.json field '{key}' should be {kind.__name__}, got {value!r}")
    return value
