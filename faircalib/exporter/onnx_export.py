"""Model + QuantArtifact -> ONNX of one denoiser forward (input_ids [batch, seq] -> logits), with the
quantized weights as INT4 / INT8 initializers behind DequantizeLinear.

Export is a sequence of graph-to-graph steps (the way NVIDIA modelopt does it):
1. torch.onnx.export (dynamo) of the fake-quant student: rotations, online Hadamards and per-token
   activation fake-quant arithmetic come out as ordinary ops; each quantized linear becomes a MatMul
   whose weight is a constant-folded float initializer W^T [K, N].
2. ``detach_weight_initializers`` finds each of those initializers by content in the exporter's graph and
   leaves a placeholder, so the proto never holds the float weights; ``quantize_weight_initializers`` puts
   the integer codes [K, N], their scales (and zero-points) and a DequantizeLinear in its place: blocked
   along K for group-wise weights, per output channel otherwise.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.errors import ConfigError
from faircalib.exporter.bundle import bundle_files, prepare, write_bundle
from faircalib.exporter.passes import (
    dedicated_activation_qdq,
    detach_weight_initializers,
    half_precision_activation_qdq,
    quantize_weight_initializers,
    quantized_layers,
)
from faircalib.exporter.profiles import OPSET, Profile
from faircalib.exporter.trt_rules import check_tensorrt
from faircalib.files import check_output_dir
from faircalib.models.base import Denoiser
from faircalib.sampling import Sampling


def export_student(student: Denoiser, prof: Profile, opset: int = OPSET) -> onnx.ModelProto:
    """One forward of ``student`` (already in the profile's dtype) with quantized weight initializers, unchecked:
    the checker serialises what it checks, which protobuf cannot above 2 GB, so the bundle checks its file."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long, device=student.device)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own, not ours
        program = torch.onnx.export(
            student, (example,), dynamo=True, opset_version=opset, input_names=["input_ids"],
            output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False,
        )  # fmt: skip
    if not prof.quantized:
        return program.model_proto
    # W^T is read from the student in its own dtype, so an fp16 initializer matches it exactly in float32.
    layers = quantized_layers(student)
    found = detach_weight_initializers(program.model.graph, layers)  # before the proto: no float weights in it
    model = program.model_proto
    del program  # it holds the traced graph and its constants: the proto is all the passes need
    scale_dtype = np.float16 if prof.dtype == torch.float16 else np.float32
    quantize_weight_initializers(model, layers, found, scale_dtype)
    if prof.dtype == torch.float16:
        half_precision_activation_qdq(model)
    if prof.static_activations:
        dedicated_activation_qdq(model)
    return model


EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf cannot serialise 2 GB; leave headroom for the graph
BUNDLE_FILES = bundle_files("model.onnx", "model.onnx.data")


def export_bundle(
    model: Denoiser,
    artifact: QuantArtifact | None,
    profile_name: str,
    out: str | Path,
    *,
    sampling: Sampling | None = None,
    opset: int = OPSET,
    overwrite: bool = False,
    parity: dict | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write the bundle ``out/``: model.onnx (+ model.onnx.data when large), schedule.json, the tokenizer files
    and manifest.json, all at once or not at all. ``model`` is the full-precision checkpoint as loaded (it is
    left as it is); ``artifact`` the student to export (None for a full-precision profile); ``sampling`` the
    schedule to unroll (default: the artifact's, else the family's reference one)."""
    job = prepare(model, artifact, profile_name, "onnx", sampling)
    check_output_dir(Path(out), BUNDLE_FILES, overwrite)
    student = job.student
    if student is model and model.dtype != job.prof.dtype:
        student = copy.deepcopy(model)  # cast a copy: the user's model keeps its dtype
    graph = export_student(student.to(job.prof.dtype), job.prof, opset)
    if job.prof.tensorrt:
        violations = check_tensorrt(graph)
        if violations:
            raise ConfigError(f"the {job.prof.name} graph breaks TensorRT's quantization rules: {violations[0]}")

    def write_model(staging: Path) -> dict:
        # the initializers' bytes, counted without serialising the model (which protobuf cannot above 2 GB)
        external = sum(len(t.raw_data) for t in graph.graph.initializer) > external_data_threshold
        onnx.save_model(
            graph, str(staging / "model.onnx"), save_as_external_data=external, all_tensors_to_one_file=True,
            location="model.onnx.data", size_threshold=1024,
        )  # fmt: skip
        onnx.checker.check_model(str(staging / "model.onnx"), full_check=True)  # the file: at any size
        return {"opset": opset, "external_data": external, "inputs": {"input_ids": ["batch", "seq"]},
                "outputs": {"logits": ["batch", "seq", model.spec.vocab_size]}}  # fmt: skip

    return write_bundle(Path(out), job, artifact, BUNDLE_FILES, overwrite, parity, write_model)
