"""Export profiles: what each target runtime accepts, and the refusal of an artifact it cannot express."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import QuantConfig
from faircalib.calib.promotion import PROMOTED_BITS
from faircalib.errors import ConfigError

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
    container: str = "onnx"  # or "gguf" (llama.cpp)
    activation_blocks: int | None = None  # per-token scales per block of inputs (llama.cpp's Q8_0 activations)
    fp16_scales: bool = False  # weight scales stored in fp16
    promoted_bits: tuple[int, ...] = ()  # weight bits of linears kept wider than the rest (mixed precision)

    def check(self, artifact: QuantArtifact | None) -> None:
        """Refuse an artifact this profile cannot express faithfully (or a missing / superfluous one)."""
        if not self.quantized:
            if artifact is not None:
                raise ConfigError(f"profile {self.name} exports the full-precision model: drop the artifact")
            return
        if artifact is None:
            raise ConfigError(f"profile {self.name} exports a calibrated student: give its artifact")
        self.check_config(artifact.config)

    def problems(self, cfg: QuantConfig) -> list[str]:
        """What of ``cfg`` this profile cannot express, in words."""
        problems = []
        if cfg.wbits not in self.weight_bits:
            problems.append(f"{cfg.wbits}-bit weights (it takes {_words(self.weight_bits)}-bit)")
        if cfg.abits not in self.activation_bits:
            problems.append(f"{cfg.abits}-bit activations (it takes {_words(self.activation_bits)}-bit)")
        if self.symmetric_only and not cfg.w_symmetric:
            problems.append("asymmetric weights with zero-points (it takes signed symmetric codes only)")
        if self.block_sizes is not None and cfg.group_size not in self.block_sizes:
            takes = " or ".join("per-channel" if b is None else f"blocks of {b} along K" for b in self.block_sizes)
            group = "per-channel scales" if cfg.group_size is None else f"group size {cfg.group_size}"
            problems.append(f"{group} (it takes {takes})")
        if cfg.abits < 16 and cfg.a_static != self.static_activations:
            wanted = "static per-tensor (calibrate with --a-static)" if self.static_activations else "per-token"
            problems.append(f"{'static' if cfg.a_static else 'per-token'} activation scales (it takes {wanted})")
        if cfg.abits < 16 and not cfg.a_static and cfg.a_group_size != self.activation_blocks:
            has, takes = (_blocks(n) for n in (cfg.a_group_size, self.activation_blocks))
            problems.append(f"{has} activation scales (it takes {takes})")
        if self.fp16_scales and not cfg.w_fp16_scales:
            problems.append("float32 weight scales (it stores fp16 ones)")
        if cfg.promote_budget and PROMOTED_BITS not in self.promoted_bits:
            problems.append(f"linears kept at {PROMOTED_BITS}-bit weights by --promote-budget (it takes "
                            f"{_words(self.weight_bits)}-bit weights in every linear)")  # fmt: skip
        if self.container == "gguf" and cfg.rotate:
            problems.append("an online Hadamard on the FFN's down projection input, which llama.cpp cannot run")
        return problems

    def check_config(self, cfg: QuantConfig, flags: list[str] | None = None) -> None:
        """Raise when ``cfg`` cannot be exported with this profile; ``flags``: the user's flags that caused it."""
        problems = self.problems(cfg)
        if problems:
            cause = f" (from {', '.join(flags)})" if flags else ""
            raise ConfigError(f"profile {self.name} cannot express this {cfg.format} calibration{cause}: "
                              + "; ".join(problems))  # fmt: skip

    def calibration_fields(self, widths: Sequence[int] = ()) -> dict[str, object]:
        """The QuantConfig fields that make a calibration exportable with this profile: its bits, symmetry and
        activation scales, and the widest group it takes that divides every linear's input width ``widths``."""
        fields = {"wbits": self.weight_bits[0], "abits": self.activation_bits[0], "a_static": self.static_activations}
        if self.block_sizes is not None:
            fitting = [b for b in self.block_sizes if b is None or all(w % b == 0 for w in widths)]
            fields["group_size"] = (fitting or self.block_sizes)[-1]
        if self.symmetric_only:
            fields["w_symmetric"] = True
        if self.activation_blocks is not None:
            fields.update(a_group_size=self.activation_blocks, w_fp16_scales=self.fp16_scales)
        if self.container == "gguf":
            fields["rotate"] = False
        return fields


def _blocks(size: int | None) -> str:
    return "per-token" if size is None else f"per-block ({size} inputs)"


def _words(values: tuple[int, ...]) -> str:
    return " or ".join(str(v) for v in values)


PROFILES = {
    "trt-w4a16": Profile("trt-w4a16", torch.float16, True, (4,), (16,), True, (64, 128)),
    "ort-w4a16": Profile("ort-w4a16", torch.float32, False, (4,), (16,), False, None, promoted_bits=(8,)),
    "ort-w4a4": Profile("ort-w4a4", torch.float32, False, (4,), (4,), False, None, promoted_bits=(8,)),
    "ort-w4a8": Profile("ort-w4a8", torch.float32, False, (4,), (8,), False, None, promoted_bits=(8,)),
    "trt-w8a8": Profile("trt-w8a8", torch.float16, True, (8,), (8,), True, (None,), static_activations=True),
    "ort-w8a8": Profile("ort-w8a8", torch.float32, False, (8,), (8,), True, None, static_activations=True),
    "ort-fp32": Profile("ort-fp32", torch.float32, False, (), (), False, None, quantized=False),
    # llama.cpp multiplies Q4_0 / Q8_0 weights by activations it quantizes to int8 in blocks of 32: W4A8, W8A8
    "gguf-q4_0": Profile(
        "gguf-q4_0",
        torch.float32,
        False,
        (4,),
        (8,),
        True,
        (32,),
        container="gguf",
        activation_blocks=32,
        fp16_scales=True,
        promoted_bits=(8,),  # Q8_0 tensors beside the Q4_0 ones
    ),  # fmt: skip
    "gguf-q8_0": Profile(
        "gguf-q8_0",
        torch.float32,
        False,
        (8,),
        (8,),
        True,
        (32,),
        container="gguf",
        activation_blocks=32,
        fp16_scales=True,
    ),  # fmt: skip
    "gguf-f16": Profile("gguf-f16", torch.float16, False, (), (), False, None, quantized=False, container="gguf"),
    "gguf-f32": Profile("gguf-f32", torch.float32, False, (), (), False, None, quantized=False, container="gguf"),
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown export profile {name!r}: choose one of {', '.join(PROFILES)}") from None


def exportable_as(cfg: QuantConfig) -> list[str]:
    """The quantized profiles a calibration with ``cfg`` exports to."""
    return [name for name, prof in PROFILES.items() if prof.quantized and not prof.problems(cfg)]
