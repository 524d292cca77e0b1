"""Model + QuantArtifact -> one GGUF file that llama.cpp's LLaDA / Dream loaders read, in a bundle beside
schedule.json, the tokenizer files and a manifest (the layout of the ONNX bundles).

Quantized linears go in as the artifact's own integer codes and fp16 scales, packed into Q4_0 (blocks of 32
along K: an fp16 scale, then element j in the low nibble of byte j and element j + 16 in the high nibble,
stored as code + 8) or Q8_0 (an fp16 scale and 32 int8 codes): nothing is quantized again. The token
embedding and the LM head stay F16 (the student keeps them at full precision; gguf-f32 keeps every matrix
F32), norms and biases F32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.linear import QuantizedWeight, QuantLinear
from faircalib.errors import ConfigError
from faircalib.exporter.bundle import bundle_files, prepare, write_bundle
from faircalib.exporter.vocab import gguf_vocabulary
from faircalib.models.base import Denoiser, GGUFLayout
from faircalib.sampling import Sampling

GGUF_FILE = "model.gguf"
BUNDLE_FILES = bundle_files(GGUF_FILE)


def pack_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed 4-bit codes [N, K] in [-8, 7] and fp16-exact scales [N, K / 32] -> Q4_0 blocks, uint8 [N, K / 32 * 18]."""
    n, k = codes.shape
    q = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 32, 32).numpy()
    d = scale.to(torch.float16).numpy().astype("<f2").reshape(n, k // 32, 1).view(np.uint8)
    return np.concatenate([d, q[..., :16] | (q[..., 16:] << 4)], axis=-1).reshape(n, k // 32 * 18)


def pack_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed 8-bit codes [N, K] and fp16-exact scales [N, K / 32] -> Q8_0 blocks, uint8 [N, K / 32 * 34]."""
    n, k = codes.shape
    q = codes.to(torch.int8).reshape(n, k // 32, 32).numpy().view(np.uint8)
    d = scale.to(torch.float16).numpy().astype("<f2").reshape(n, k // 32, 1).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(n, k // 32 * 34)


def rope_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of each head from two halves (the checkpoint's rotary layout) to adjacent pairs
    (llama.cpp's "normal" rope); whole rows move, so a row's codes and scales move together."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def quantized_blocks(weight: QuantizedWeight) -> tuple[np.ndarray, Any]:
    """A quantized linear's codes and scales as GGUF blocks, exactly; anything they cannot express is refused."""
    import gguf

    scale = weight.scale.float()
    if weight.zero is not None or scale.shape[1] * 32 != weight.codes.shape[1]:
        raise ConfigError("GGUF Q4_0 / Q8_0 take symmetric codes in groups of 32: calibrate with --target gguf-q4_0")
    if not torch.equal(scale.half().float(), scale):
        raise ConfigError("GGUF blocks store fp16 scales and these are not: calibrate with --target gguf-q4_0")
    codes = weight.codes.cpu()
    if weight.spec.bits == 4:
        return pack_q4_0(codes, scale.cpu()), gguf.GGMLQuantizationType.Q4_0
    return pack_q8_0(codes, scale.cpu()), gguf.GGMLQuantizationType.Q8_0


def gguf_tensors(student: Denoiser, layout: GGUFLayout, matrices: type) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, array, quantized type or None) of every tensor of ``student``, named from its official key;
    matrices that are not quantized in the numpy type ``matrices``, vectors in float32."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == layout.arch)
    names = gguf.get_tensor_name_map(arch, len(student.blocks))
    module_names = {id(module): name for name, module in student.named_modules()}
    block_prefixes = [module_names[id(block)] + "." for block in student.blocks]
    quantized = {f"{name}.weight": m for name, m in student.named_modules() if isinstance(m, QuantLinear)}
    out = []
    for key, tensor in student.state_dict().items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"llama.cpp's {layout.arch} has no tensor for {key}")
        if key in quantized:
            array, kind = quantized_blocks(quantized[key].quantized)
        else:
            array, kind = tensor.detach().float().cpu().numpy(), None
            array = array.astype(matrices) if array.ndim == 2 else array
        local = next((key[len(p) :] for p in block_prefixes if key.startswith(p)), None)
        if local in layout.rope_pairs:
            array = rope_pairs(array, layout.rope_pairs[local])
        out.append((target, np.ascontiguousarray(array), kind))
    return out


def write_gguf(path: Path, student: Denoiser, layout: GGUFLayout, source: Path | None, matrices: type) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_name(source.name if source is not None else layout.arch)
    for key, value in layout.hparams.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_rope_dimension_count(layout.hparams["embedding_length"] // layout.hparams["head_count"])
    writer.add_causal_attention(False)
    writer.add_vocab_size(student.spec.vocab_size)
    writer.add_diffusion_shift_logits(layout.shift_logits)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocabulary(writer, source, student.spec.vocab_size, layout.special_tokens)
    for name, array, kind in gguf_tensors(student, layout, matrices):
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    model: Denoiser,
    artifact: QuantArtifact | None,
    profile_name: str,
    out: str | Path,
    *,
    sampling: Sampling | None = None,
    overwrite: bool = False,
    parity: dict | None = None,
    consume: bool = False,
) -> Path:
    """Write the bundle ``out/``: model.gguf, schedule.json, the tokenizer files and manifest.json, all at once
    or not at all. ``model`` (left as it is, unless ``consume``: the student is made of it) is the full-precision
    checkpoint; ``artifact`` the student to export (None for gguf-f16 and gguf-f32, the full-precision model)."""
    job = prepare(model, artifact, profile_name, "gguf", sampling, consume)
    layout = model.gguf_layout()
    if layout is None:
        raise ConfigError(f"llama.cpp has no loader for {model.spec.family} models: GGUF export takes LLaDA or Dream")

    def write_model(staging: Path) -> dict:
        matrices = np.float32 if job.prof.name == "gguf-f32" else np.float16
        write_gguf(staging / GGUF_FILE, job.student, layout, model.source, matrices)
        return {"gguf": {"architecture": layout.arch, "tensor_types": tensor_types(job.prof.name)}}

    return write_bundle(Path(out), job, artifact, BUNDLE_FILES, overwrite, parity, write_model)


def tensor_types(profile_name: str) -> dict[str, str]:
    """Which GGUF type each kind of tensor gets under a profile."""
    if profile_name == "gguf-f32":
        return {"matrices": "F32", "norms, biases": "F32"}
    linear = {"gguf-q4_0": "Q4_0", "gguf-q8_0": "Q8_0", "gguf-f16": "F16"}[profile_name]
    return {"block linears": linear, "token_embd, output": "F16", "norms, biases": "F32"}
