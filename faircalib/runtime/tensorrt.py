"""TensorRT engines from an exported bundle, and a runner with the backend interface.

TensorRT is imported lazily: it installs from NVIDIA's package index (or ships with JetPack) and needs a
GPU, so nothing else in faircalib depends on it. The bundle's ONNX carries explicit Q/DQ, so the network
is built strongly typed: the graph's own dtypes (fp16 activations, INT4 weights behind DequantizeLinear)
decide the precision and no precision flags are set (TensorRT's guidance for explicit quantization).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from faircalib.errors import ConfigError, FaircalibError
from faircalib.exporter.onnx_export import BUNDLE_FILES
from faircalib.files import check_output_dir, staged_dir

ENGINE_FILE = "model.engine"
ENGINE_DIR_FILES = (ENGINE_FILE, "engine.json", *BUNDLE_FILES)
INSTALL_HINT = (
    "TensorRT is not installed. On an x86 machine with an NVIDIA GPU: pip install 'faircalib[gpu]' "
    "(TensorRT 10.8+ builds int4 weight-only engines); on Jetson it ships with JetPack 6.x "
    "(python3 -c 'import tensorrt')."
)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise FaircalibError(INSTALL_HINT) from None
    return tensorrt


@dataclass(frozen=True)
class EngineConfig:
    """The optimization profile of input_ids [batch, seq] and the builder's workspace."""

    min_seq: int = 2
    opt_seq: int = 256
    max_seq: int = 1024
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 4.0
    # Precision flags build a weakly typed network instead (for graphs without Q/DQ, e.g. an fp32
    # export): TensorRT then picks fp16 / int8 kernels itself. Q/DQ bundles need neither.
    fp16: bool = False
    int8: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_seq <= self.opt_seq <= self.max_seq:
            raise ConfigError(
                f"need 1 <= min_seq <= opt_seq <= max_seq, got {self.min_seq}, {self.opt_seq}, {self.max_seq}"
            )
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"need 1 <= opt_batch <= max_batch, got {self.opt_batch}, {self.max_batch}")
        if self.workspace_gib <= 0:
            raise ConfigError("workspace_gib must be positive")


def cache_key(onnx_path: Path, cfg: EngineConfig, trt_version: str, device_name: str) -> str:
    """An engine is reusable only for the same graph, profile, TensorRT version and GPU."""
    digest = hashlib.sha256()
    with onnx_path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.is_file():
        digest.update(str(data.stat().st_size).encode())
    digest.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    digest.update(f"{trt_version}|{device_name}".encode())
    return digest.hexdigest()


def build_engine(
    bundle: str | Path, out: str | Path, cfg: EngineConfig = EngineConfig(), overwrite: bool = False
) -> Path:
    """Build (or reuse from ``out``) the engine of ``bundle/model.onnx``; ``out`` becomes a bundle whose
    model is ``model.engine``, with the same schedule.json, tokenizer files and manifest, written whole or
    not at all (never over a directory faircalib did not write, unless ``overwrite``)."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise FaircalibError("building a TensorRT engine needs an NVIDIA GPU, and torch sees none")
    bundle, out = Path(bundle), Path(out)
    check_output_dir(out, ENGINE_DIR_FILES, overwrite)
    onnx_path = bundle / "model.onnx"
    if not onnx_path.is_file():
        raise ConfigError(f"no model.onnx in {bundle}: run faircalib export first")
    key = cache_key(onnx_path, cfg, trt.__version__, torch.cuda.get_device_name())
    cached = out / "engine.json"
    if (out / ENGINE_FILE).is_file() and cached.is_file() and json.loads(cached.read_text()).get("cache_key") == key:
        return out

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = not (cfg.fp16 or cfg.int8)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external data next to it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FaircalibError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * 2**30))
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if cfg.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, cfg.min_seq), (cfg.opt_batch, cfg.opt_seq), (cfg.max_batch, cfg.max_seq))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FaircalibError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")

    with staged_dir(out, ENGINE_DIR_FILES, overwrite) as staging:
        (staging / ENGINE_FILE).write_bytes(bytes(serialized))
        for item in bundle.iterdir():
            if item.is_file() and not item.name.startswith("model.onnx"):
                shutil.copy2(item, staging / item.name)
        engine_info = {
            "cache_key": key, "tensorrt": trt.__version__, "device": torch.cuda.get_device_name(),
            "profile": asdict(cfg), "source": str(onnx_path),
        }  # fmt: skip
        (staging / "engine.json").write_text(json.dumps(engine_info, indent=2) + "\n")
    return out


class TensorRTBackend:
    """Runs a built engine: input_ids [B, L] int64 -> logits [B, L, V] float32 (on the CPU)."""

    name = "trt"

    def __init__(self, engine_dir: str | Path):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise FaircalibError("running a TensorRT engine needs an NVIDIA GPU, and torch sees none")
        path = Path(engine_dir) / ENGINE_FILE
        if not path.is_file():
            raise ConfigError(f"no {ENGINE_FILE} in {engine_dir}: run faircalib build-engine first")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise FaircalibError(f"{path} does not deserialize with TensorRT {trt.__version__} on this GPU: rebuild it")
        self.context = self.engine.create_execution_context()
        self._out_dtype = {trt.float16: torch.float16, trt.float32: torch.float32, trt.bfloat16: torch.bfloat16}[
            self.engine.get_tensor_dtype("logits")
        ]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(device="cuda", dtype=torch.int64).contiguous()
        if not self.context.set_input_shape("input_ids", tuple(ids.shape)):
            raise ConfigError(f"input shape {tuple(ids.shape)} is outside the engine's optimization profile")
        logits = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=self._out_dtype, device="cuda")
        self.context.set_tensor_address("input_ids", ids.data_ptr())
        self.context.set_tensor_address("logits", logits.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise FaircalibError("TensorRT execution failed")
        stream.synchronize()
        return logits.float().cpu()
