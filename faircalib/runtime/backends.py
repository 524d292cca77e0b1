"""Backends with one interface: ``backend(input_ids [B, L] int64) -> logits [B, L, V] float32``.

Any of them can stand in for the denoiser of the sampler, so the same schedule drives the PyTorch
teacher, the exported ONNX student and a TensorRT engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from faircalib.errors import CheckpointError, ConfigError
from faircalib.models.base import Denoiser


class TorchBackend:
    name = "torch"

    def __init__(self, model: Denoiser):
        self.model = model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] where the model runs, in its dtype (no copy to the host)."""
        return self.model(input_ids.to(self.model.device))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids).float().cpu()


class OrtBackend:
    """ONNX Runtime on a bundle's model.onnx: CUDA when onnxruntime-gpu sees a GPU, else CPU.

    ``exact`` (default) keeps ORT from fusing int4 DequantizeLinear -> MatMul into MatMulNBits with
    int8-quantized activations (accuracy level 4), which would be a different model than the one
    calibrated.
    """

    name = "ort"

    def __init__(self, bundle: str | Path, providers: list[str] | None = None, exact: bool = True, threads: int = 0):
        import onnxruntime as ort

        path = Path(bundle)
        path = path / "model.onnx" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"no model.onnx at {bundle}")
        options = ort.SessionOptions()
        if exact:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ConfigError(f"ONNX Runtime here lacks {missing}; it has {available}")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = np.ascontiguousarray(input_ids.detach().cpu().numpy().astype(np.int64))
        return torch.from_numpy(self.session.run(None, {"input_ids": ids})[0]).float()


def bundle_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{bundle} is not an exported bundle (no manifest.json)")
    return json.loads(path.read_text())
