"""Model + QuantArtifact -> ONNX of one denoiser forward (input_ids [batch, seq] -> logits), with the
quantized weights as INT4 / INT8 initializers behind DequantizeLinear.

Export is a sequence of graph-to-graph steps (the way NVIDIA modelopt does it):
1. torch.onnx.export (dynamo) of the fake-quant student: rotations, online Hadamards and per-token
   activation fake-quant arithmetic come out as ordinary ops; each quantized linear becomes a MatMul
   whose weight is a constant-folded float initializer W^T [K, N].
2. ``quantize_weight_initializers`` finds each of those initializers by content and replaces it with the
   integer codes [K, N], their scales (and zero-points) and a DequantizeLinear: blocked along K for
   group-wise weights, per output channel otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from faircalib import __version__
from faircalib.calib.artifact import QuantArtifact, model_fingerprint, replace_dir
from faircalib.calib.evaluate import fake_quant_student
from faircalib.calib.linear import QuantizedWeight, QuantLinear
from faircalib.errors import ConfigError
from faircalib.exporter.graph import activation_qdq_pairs, consumers
from faircalib.exporter.schedule_file import write_schedule
from faircalib.exporter.trt_rules import check_tensorrt
from faircalib.models import load_denoiser
from faircalib.models.base import Denoiser
from faircalib.models.checkpoint import write_json_atomic
from faircalib.sampling import Sampling, default_sampling, sampling_from_json_dict

OPSET = 21


@dataclass(frozen=True)
class Profile:
    """What a target runtime accepts; ``check`` refuses artifacts it cannot express faithfully."""

    name: str
    dtype: torch.dtype  # activations and scales
    tensorrt: bool
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    symmetric_only: bool
    block_sizes: tuple[int | None, ...] | None  # the group sizes it takes (None in it: per-channel); None: any
    quantized: bool = True  # False: the full-precision teacher, the reference for speed
    static_activations: bool = False  # per-tensor calibrated activation scales (QuantizeLinear), not per-token

    def check(self, artifact: QuantArtifact | None) -> None:
        if not self.quantized:
            if artifact is not None:
                raise ConfigError(f"profile {self.name} exports the full-precision model: drop the artifact")
            return
        if artifact is None:
            raise ConfigError(f"profile {self.name} exports a calibrated student: give its artifact")
        cfg = artifact.config
        problems = []
        if cfg.wbits not in self.weight_bits:
            problems.append(f"{cfg.wbits}-bit weights (it takes {self.weight_bits})")
        if cfg.abits not in self.activation_bits:
            problems.append(f"{cfg.abits}-bit activations (it takes {self.activation_bits})")
        if self.symmetric_only and not cfg.w_symmetric:
            problems.append("asymmetric weights with zero-points (it takes signed symmetric codes only)")
        if self.block_sizes is not None and cfg.group_size not in self.block_sizes:
            takes = ", ".join("per-channel" if b is None else f"blocks of {b} along K" for b in self.block_sizes)
            problems.append(f"group size {cfg.group_size} (it takes {takes})")
        if cfg.abits < 16 and cfg.a_static != self.static_activations:
            wanted = "static per-tensor (calibrate with --a-static)" if self.static_activations else "per-token"
            problems.append(f"{'static' if cfg.a_static else 'per-token'} activation scales (it takes {wanted})")
        if problems:
            raise ConfigError(f"profile {self.name} cannot express this {cfg.format} artifact: " + "; ".join(problems))


PROFILES = {
    "trt-w4a16": Profile("trt-w4a16", torch.float16, True, (4,), (16,), True, (64, 128)),
    "ort-w4a16": Profile("ort-w4a16", torch.float32, False, (4,), (16,), False, None),
    "ort-w4a4": Profile("ort-w4a4", torch.float32, False, (4,), (4,), False, None),
    "ort-w4a8": Profile("ort-w4a8", torch.float32, False, (4,), (8,), False, None),
    "trt-w8a8": Profile("trt-w8a8", torch.float16, True, (8,), (8,), True, (None,), static_activations=True),
    "ort-w8a8": Profile("ort-w8a8", torch.float32, False, (8,), (8,), True, None, static_activations=True),
    "ort-fp32": Profile("ort-fp32", torch.float32, False, (), (), False, None, quantized=False),
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown export profile {name!r}: choose one of {', '.join(PROFILES)}") from None


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _integer_array(codes: torch.Tensor, bits: int, signed: bool) -> np.ndarray:
    values = codes.cpu().numpy()
    if bits == 4:
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return values.astype(np.int8 if signed else np.uint8)


def quantize_weight_initializers(model: onnx.ModelProto, layers: dict[str, FoldedWeight], scale_dtype: np.dtype) -> int:
    """Replace every initializer equal to a layer's folded W^T by codes + DequantizeLinear.

    A W^T that holds the centred codes themselves (``scaled_after``) dequantizes with unit scales.
    Returns how many initializers were replaced; every layer must be found exactly once.
    """
    graph = model.graph
    wanted = {_digest(layer.values): (key, layer) for key, layer in layers.items()}
    if len(wanted) != len(layers):
        raise ConfigError("two quantized layers have identical weights: cannot tell their initializers apart")
    found: set[str] = set()
    replaced: set[str] = set()
    # integer initializers too: a student keeping its centred codes as int8 / int16 exports them as such,
    # cast to float where they are multiplied
    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.INT16)
    for init in list(graph.initializer):
        if init.data_type not in kinds:
            continue
        value = numpy_helper.to_array(init)
        match = wanted.get(_digest(value.astype(np.float32, copy=False)))
        if match is None or value.size != match[1].values.size:
            continue
        key, folded = match
        q = folded.quantized
        if key in found:
            raise ConfigError(f"layer {key} appears twice in the exported graph")
        found.add(key)
        replaced.add(init.name)
        graph.initializer.remove(init)
        prefix = key.replace(".", "_")
        codes = _integer_array(q.codes.T.contiguous(), q.spec.bits, q.spec.symmetric)  # [K, N]
        inputs = [f"{prefix}_codes", f"{prefix}_scale"]
        group = q.codes.shape[1] // q.scale.shape[1]
        blocked = q.spec.group_size is not None  # even a single group: TensorRT takes blocked DQ only
        scale = q.scale.T.contiguous().numpy() if blocked else q.scale[:, 0].numpy()  # [G, N] or [N]
        if folded.scaled_after:
            scale = np.ones_like(scale)
        new = [numpy_helper.from_array(codes, inputs[0]), numpy_helper.from_array(scale.astype(scale_dtype), inputs[1])]
        if q.zero is not None:
            zero = q.zero.T.contiguous() if blocked else q.zero[:, 0]
            inputs.append(f"{prefix}_zero")
            new.append(numpy_helper.from_array(_integer_array(zero.round(), q.spec.bits, False), inputs[2]))
        graph.initializer.extend(new)
        attrs = {"axis": 0, "block_size": group} if blocked else {"axis": 1}
        nodes = [helper.make_node("DequantizeLinear", inputs, [init.name], name=f"{prefix}_dequantize", **attrs)]
        if tuple(value.shape) != codes.shape:  # the exporter folded a reshape of W^T (per-group products)
            nodes[0].output[0] = f"{prefix}_dequantized"
            shape = numpy_helper.from_array(np.array(value.shape, dtype=np.int64), f"{prefix}_shape")
            graph.initializer.append(shape)
            reshape = helper.make_node(
                "Reshape", [nodes[0].output[0], shape.name], [init.name], name=f"{prefix}_reshape"
            )
            nodes.append(reshape)
        for node in reversed(nodes):
            graph.node.insert(0, node)
    missing = sorted(set(layers) - found)
    if missing:
        raise ConfigError(f"the exported graph has no weight initializer for {', '.join(missing[:3])}")
    # An integer initializer's recorded type would contradict the float its DequantizeLinear now makes, and
    # the Cast to float the student multiplied it through now reads that float: drop both.
    stale = [info for info in graph.value_info if info.name in replaced]
    for info in stale:
        graph.value_info.remove(info)
    dequantized = helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype))
    readers = consumers(graph)
    for name in replaced:
        for cast in readers.get(name, []):
            to = next((a for a in cast.attribute if a.name == "to"), None)
            if cast.op_type != "Cast" or to is None or helper.get_attribute_value(to) != dequantized:
                continue
            for user in readers.get(cast.output[0], []):
                user.input[:] = [name if i == cast.output[0] else i for i in user.input]
            graph.node.remove(cast)
    return len(found)


def half_precision_activation_qdq(model: onnx.ModelProto) -> int:
    """Give every activation QuantizeLinear -> DequantizeLinear pair fp16 scales and drop the Cast back
    to fp16 behind it: the exporter keeps float32 scales on fp16 activations, which ONNX (and TensorRT)
    refuse, since a quantizer's scale takes its input's type. Returns how many pairs changed."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = consumers(graph)
    changed = 0
    for quantize, dequantize in list(activation_qdq_pairs(graph, readers)):
        casts = readers.get(dequantize.output[0], [])
        to_half = [c for c in casts if c.op_type == "Cast" and helper.get_attribute_value(c.attribute[0]) == 10]
        if not casts or len(to_half) != len(casts):
            continue
        for name in {quantize.input[1], dequantize.input[1]}:
            scale = initializers[name]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16), name))
        for cast in to_half:
            for user in readers.get(cast.output[0], []):
                user.input[:] = [dequantize.output[0] if i == cast.output[0] else i for i in user.input]
            graph.node.remove(cast)
        changed += 1
    if changed:
        del graph.value_info[:]  # recorded float32 types for what is fp16 now; shape inference redoes it
    return changed


def dedicated_activation_qdq(model: onnx.ModelProto) -> int:
    """Give each consumer of a shared activation QuantizeLinear -> DequantizeLinear pair its own pair,
    with its own copies of the scale and zero-point (the exporter merges the identical quantizers of q, k
    and v, which read one tensor). ONNX Runtime turns DequantizeLinear -> MatMul into an integer GEMM only
    when the pair serves that one MatMul, and its common-subexpression pass would merge pairs that share
    their scale names. Returns how many pairs were added."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = consumers(graph)
    added = 0
    for quantize, dequantize in list(activation_qdq_pairs(graph, readers)):
        position = list(graph.node).index(dequantize) + 1
        for user in readers.get(dequantize.output[0], [])[1:]:
            added += 1
            tag = f"_{added}"
            params = []
            for name in quantize.input[1:]:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = name + tag
                graph.initializer.append(copy)
                params.append(copy.name)
            codes, value = quantize.output[0] + tag, dequantize.output[0] + tag
            nodes = [
                helper.make_node("QuantizeLinear", [quantize.input[0], *params], [codes], name=quantize.name + tag),
                helper.make_node("DequantizeLinear", [codes, *params], [value], name=dequantize.name + tag),
            ]
            for offset, node in enumerate(nodes):
                graph.node.insert(position + offset, node)
            user.input[:] = [value if name == dequantize.output[0] else name for name in user.input]
    return added


@dataclass(frozen=True)
class FoldedWeight:
    """W^T [K, N] as the student multiplies it, in float32 (what the exporter folds into an initializer):
    the dequantized weight, or, when ``scaled_after`` (per-token quantized activations), the centred
    codes whose scales are applied after the product."""

    values: np.ndarray
    quantized: QuantizedWeight
    scaled_after: bool


def quantized_layers(student: Denoiser) -> dict[str, FoldedWeight]:
    """key -> the folded weight of every quantized linear of ``student``."""
    layers = {}
    for index, block in enumerate(student.blocks):
        for group in student.linear_groups():
            for name in group:
                layer = block.get_submodule(name)
                if not isinstance(layer, QuantLinear):
                    raise ConfigError(f"blocks.{index}.{name} is not quantized")
                scaled_after = layer.weight is None
                values = layer.weight_codes if scaled_after else layer.weight.T
                layers[f"blocks.{index}.{name}"] = FoldedWeight(
                    values.detach().float().contiguous().numpy(), layer.quantized, scaled_after
                )
    return layers


def export_student(student: Denoiser, prof: Profile, opset: int = OPSET) -> onnx.ModelProto:
    """One forward of ``student`` (already in the profile's dtype) with quantized weight initializers."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long, device=student.device)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    with torch.no_grad():
        program = torch.onnx.export(
            student, (example,), dynamo=True, opset_version=opset, input_names=["input_ids"],
            output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False,
        )  # fmt: skip
    model = program.model_proto
    if not prof.quantized:
        onnx.checker.check_model(model, full_check=True)
        return model
    scale_dtype = np.float16 if prof.dtype == torch.float16 else np.float32
    # W^T is read from the student in its own dtype, so an fp16 initializer matches it exactly in float32.
    quantize_weight_initializers(model, quantized_layers(student), scale_dtype)
    if prof.dtype == torch.float16:
        half_precision_activation_qdq(model)
    if prof.static_activations:
        dedicated_activation_qdq(model)
    onnx.checker.check_model(model, full_check=True)
    return model


EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf cannot serialise 2 GB; leave headroom for the graph


def export_bundle(
    model_dir: str | Path,
    artifact_dir: str | Path | None,
    profile_name: str,
    out: str | Path,
    sampling: Sampling | None = None,
    opset: int = OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``out/``: model.onnx (+ model.onnx.data when large), schedule.json, the tokenizer files and
    manifest.json. Built in a temporary directory and renamed into place."""
    model_dir, out = Path(model_dir), Path(out)
    prof = profile(profile_name)
    artifact = QuantArtifact.load(artifact_dir) if artifact_dir is not None else None
    prof.check(artifact)
    teacher = load_denoiser(model_dir)
    if artifact is None:
        student = teacher
        sampling = sampling or default_sampling(teacher.spec)
        made_from = {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)}
    else:
        artifact.check_model(model_dir)
        if sampling is None:
            recorded = artifact.manifest.get("sampling")
            if recorded is None:
                raise ConfigError("the artifact records no deployment schedule: pass the decoding settings")
            sampling = sampling_from_json_dict(recorded)
        student = fake_quant_student(teacher, artifact)
        made_from = artifact.manifest.get("model")
    student = student.to(prof.dtype)
    graph = export_student(student, prof, opset)
    if prof.tensorrt:
        violations = check_tensorrt(graph)
        if violations:
            raise ConfigError(f"the {prof.name} graph breaks TensorRT's quantization rules: {violations[0]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        external = graph.ByteSize() > external_data_threshold
        onnx.save_model(
            graph, str(staging / "model.onnx"), save_as_external_data=external, all_tensors_to_one_file=True,
            location="model.onnx.data", size_threshold=1024,
        )  # fmt: skip
        write_schedule(staging, student.spec, sampling)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        write_json_atomic(
            staging / "manifest.json",
            {
                "faircalib_version": __version__,
                "profile": prof.name,
                "opset": opset,
                "external_data": external,
                "model": made_from,
                "artifact": None
                if artifact is None
                else {"path": str(artifact_dir), "method": artifact.config.method, "format": artifact.config.format},
                "inputs": {"input_ids": ["batch", "seq"]},
                "outputs": {"logits": ["batch", "seq", student.spec.vocab_size]},
            },
        )
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model",
)  # fmt: skip
