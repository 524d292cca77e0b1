"""Model + QuantArtifact -> ONNX of one denoiser forward (input_ids [batch, seq] -> logits), with the
quantized weights as INT4 / INT8 initializers behind DequantizeLinear.

Export is a sequence of graph-to-graph steps (the way NVIDIA modelopt does it):
1. torch.onnx.export (dynamo, not yet optimized) of the fake-quant student, traced with placeholders for its
   quantized weights: rotations, online Hadamards and per-token activation fake-quant arithmetic come out as
   ordinary ops; each quantized linear reads its weight initializer (named after the buffer) through a
   Transpose, or through a Cast when it multiplies centred codes.
2. ``dequantize_weights`` puts the artifact's integer codes [K, N], their scales (and zero-points) and a
   DequantizeLinear in place of that initializer and its reader: blocked along K for group-wise weights, per
   output channel otherwise. ``lazy_transposes`` makes every other transposed weight (full-precision linears)
   transpose as it is written; then the exporter's optimizer folds what is left.
3. Activation passes on the proto: fp16 quantizer scales, one Q/DQ pair per reader for static activations.
Nothing holds a second float copy of the weights: a quantized bundle's proto holds its codes and the
full-precision tensors once, and a full-precision one is written from the model's own tensors.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.errors import ConfigError
from faircalib.exporter.bundle import bundle_files, prepare, write_bundle
from faircalib.exporter.passes import (
    dedicated_activation_qdq,
    dequantize_weights,
    half_precision_activation_qdq,
    lazy_transposes,
    traced_weights,
)
from faircalib.exporter.profiles import OPSET, Profile
from faircalib.exporter.trt_rules import check_tensorrt
from faircalib.files import check_output_dir
from faircalib.models.base import Denoiser
from faircalib.sampling import Sampling


def export_student(student: Denoiser, prof: Profile, opset: int = OPSET) -> ir.Model:
    """One forward of ``student`` (already in the profile's dtype) with quantized weight initializers, optimized
    and unchecked (the bundle checks the file it writes)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long, device=student.device)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own, not ours
        program = torch.onnx.export(
            student, (example,), dynamo=True, opset_version=opset, input_names=["input_ids"],
            output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False,
            optimize=False,
        )  # fmt: skip
    if prof.quantized:
        scale_dtype = np.float16 if prof.dtype == torch.float16 else np.float32
        dequantize_weights(program.model.graph, traced_weights(student), scale_dtype)
    lazy_transposes(program.model.graph)
    program.optimize()
    return program.model


def quantized_proto(model: ir.Model, prof: Profile) -> onnx.ModelProto:
    """The proto of a quantized export, with its activation quantizers as the profile's runtime takes them."""
    proto = ir.serde.serialize_model(model)
    if prof.dtype == torch.float16:
        half_precision_activation_qdq(proto)
    if prof.static_activations:
        dedicated_activation_qdq(proto)
    return proto


# Above this the weights go to model.onnx.data, written tensor by tensor; an inline file is serialised whole in
# memory first (twice the weights), and protobuf cannot serialise 2 GB at all.
EXTERNAL_DATA_THRESHOLD = 2**28
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
    consume: bool = False,
) -> Path:
    """Write the bundle ``out/``: model.onnx (+ model.onnx.data when large), schedule.json, the tokenizer files
    and manifest.json, all at once or not at all. ``model`` is the full-precision checkpoint as loaded (it is
    left as it is, unless ``consume``: then the student is made of it, one checkpoint's weights less in memory,
    and it is unusable afterwards); ``artifact`` the student to export (None for a full-precision profile);
    ``sampling`` the schedule to unroll (default: the artifact's, else the family's reference one)."""
    job = prepare(model, artifact, profile_name, "onnx", sampling, consume, placeholders=True)
    check_output_dir(Path(out), BUNDLE_FILES, overwrite)
    student = job.student
    if student is model and model.dtype != job.prof.dtype and not consume:
        student = copy.deepcopy(model)  # cast a copy: the user's model keeps its dtype
    graph = export_student(student.to(job.prof.dtype), job.prof, opset)
    size = sum(value.const_value.nbytes for value in graph.graph.initializers.values())
    external = size > external_data_threshold
    proto = None
    if job.prof.quantized:
        proto, graph = quantized_proto(graph, job.prof), None
    if job.prof.tensorrt:
        violations = check_tensorrt(proto)
        if violations:
            raise ConfigError(f"the {job.prof.name} graph breaks TensorRT's quantization rules: {violations[0]}")

    def write_model(staging: Path) -> dict:
        path = staging / "model.onnx"
        if proto is None:  # written tensor by tensor from the model's own: no copy of the weights
            ir.save(graph, path, external_data="model.onnx.data" if external else None, size_threshold_bytes=1024)
        else:
            onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)  # fmt: skip
        onnx.checker.check_model(str(path), full_check=True)  # the file: at any size
        return {"opset": opset, "external_data": external, "inputs": {"input_ids": ["batch", "seq"]},
                "outputs": {"logits": ["batch", "seq", model.spec.vocab_size]}}  # fmt: skip

    return write_bundle(Path(out), job, artifact, BUNDLE_FILES, overwrite, parity, write_model)
