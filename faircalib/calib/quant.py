"""Uniform integer quantizers: weights per output channel or per group along K, activations per token.

Conventions (docs/DESIGN.md, "Quantizers"): symmetric weights use signed codes in [-2^(b-1), 2^(b-1) - 1] with
scale = absmax / (2^(b-1) - 1) and no zero-point (what TensorRT's int4 GEMM takes); asymmetric weights
use unsigned codes in [0, 2^b - 1] with s = (max - min) / (2^b - 1) and z = round(-min / s).
Scales and zero-points have shape [N, K // group] (group = K for per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faircalib.errors import ConfigError

_TINY = 1e-10


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    fp16_scales: bool = False  # scales rounded to fp16, as GGUF's Q4_0 / Q8_0 blocks store them

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"weight bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def groups(self, in_features: int) -> int:
        size = self.group_size or in_features
        if in_features % size:
            raise ConfigError(f"in_features {in_features} is not a multiple of group_size {size}")
        return in_features // size


@dataclass(frozen=True)
class ActSpec:
    """Activation quantization of one linear's input; bits 16 means none.

    Per-token dynamic scales by default. ``static_amax`` (the input's calibrated peak |x|) switches to one
    static per-tensor scale, static_amax * clip_ratio / qmax, symmetric 8-bit: what TensorRT's INT8 GEMMs take.
    ``group_size`` gives each token one scale per block of that many inputs, rounded to fp16, symmetric 8-bit:
    what llama.cpp does to the activations it multiplies by Q4_0 / Q8_0 weights (its Q8_0 blocks).
    """

    bits: int = 16
    symmetric: bool = True
    clip_ratio: float = 1.0
    static_amax: float | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"activation bits must be 4, 8 or 16, got {self.bits}")
        if not 0 < self.clip_ratio <= 1:
            raise ConfigError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.static_amax is not None:
            if self.bits != 8 or not self.symmetric:
                raise ConfigError("static per-tensor activation scales are symmetric 8-bit only")
            if not self.static_amax > 0:  # also refuses NaN
                raise ConfigError(f"static activation peak must be positive, got {self.static_amax}")
        if self.group_size is not None and (self.bits != 8 or not self.symmetric or self.static_amax is not None):
            raise ConfigError("per-block activation scales are symmetric 8-bit and dynamic only")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"activation group size must be positive, got {self.group_size}")

    @property
    def static_scale(self) -> float:
        """The per-tensor scale of a static spec."""
        if self.static_amax is None:
            raise ConfigError("this activation spec has per-token dynamic scales")
        return max(self.static_amax * self.clip_ratio / (2 ** (self.bits - 1) - 1), _TINY)

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K] -> [N, groups, K // groups]."""
    return w.reshape(w.shape[0], groups, -1)


def weight_qparams(
    w: torch.Tensor, spec: WeightSpec, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [N, G] and zero-point [N, G] (None when symmetric) for w [N, K]; ``clip`` shrinks the range
    (a scalar or one ratio per [N, G] entry)."""
    g = _grouped(w.float(), spec.groups(w.shape[1]))
    if spec.symmetric:
        absmax = g.abs().amax(dim=-1) * clip
        return stored_scale(spec, (absmax / spec.qmax).clamp_min(_TINY)), None
    hi = g.amax(dim=-1).clamp_min(0) * clip
    lo = g.amin(dim=-1).clamp_max(0) * clip
    scale = stored_scale(spec, ((hi - lo) / spec.qmax).clamp_min(_TINY))
    zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def stored_scale(spec: WeightSpec, scale: torch.Tensor) -> torch.Tensor:
    """Scales as the format stores them: fp16 ones (no smaller than fp16's smallest step) or as they are."""
    return scale.half().float().clamp_min(2**-24) if spec.fp16_scales else scale


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: WeightSpec) -> torch.Tensor:
    """Integer codes of w [N, K] (int8 when symmetric, uint8 when not) on the grid of scale/zero [N, G]."""
    g = _grouped(w.float(), scale.shape[1])
    q = torch.round(g / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).reshape(w.shape).to(spec.code_dtype)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 [N, K] from codes [N, K] and scale/zero [N, G]."""
    g = _grouped(codes.float(), scale.shape[1])
    if zero is not None:
        g = g - zero.unsqueeze(-1)
    return (g * scale.unsqueeze(-1)).reshape(codes.shape)


def fake_quant_weight(w: torch.Tensor, spec: WeightSpec, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize, in w's dtype."""
    scale, zero = weight_qparams(w, spec, clip)
    return dequantize_weight(quantize_weight(w, scale, zero, spec), scale, zero).to(w.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity), for learning through quantization."""
    return (torch.round(x) - x).detach() + x


def quantize_activation(
    x: torch.Tensor, spec: ActSpec, clip: torch.Tensor | None = None, ste: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization of x [..., K] along its last dimension: zero-point-centred integer codes [..., K]
    (float32, integer-valued) and scales [..., 1] per token ([] for a static spec, [..., K / g, 1] per block of
    ``group_size``), so that x ~ codes * scale.

    ``clip`` (a tensor) overrides ``spec.clip_ratio``; ``ste`` makes rounding differentiable.
    """
    rnd = round_ste if ste else torch.round
    ratio = spec.clip_ratio if clip is None else clip
    xf = x.float()
    if spec.group_size is not None:
        return _blocked(xf, spec, ratio, rnd)
    if spec.static_amax is not None:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = (torch.as_tensor(spec.static_amax * ratio, dtype=torch.float32, device=x.device) / qmax).clamp_min(
            _TINY
        )
        return rnd(xf / scale).clamp(-qmax - 1, qmax), scale
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) * ratio / qmax).clamp_min(_TINY)
        return rnd(xf / scale).clamp(-qmax - 1, qmax), scale
    qmax = 2**spec.bits - 1
    hi = xf.amax(dim=-1, keepdim=True).clamp_min(0) * ratio
    lo = xf.amin(dim=-1, keepdim=True).clamp_max(0) * ratio
    scale = ((hi - lo) / qmax).clamp_min(_TINY)
    zero = torch.round(-lo / scale).detach()
    return rnd(xf / scale + zero).clamp(0, qmax) - zero, scale


def _blocked(xf: torch.Tensor, spec: ActSpec, ratio, rnd) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., K] and scales [..., K / g, 1] of per-block activations, as llama.cpp's quantize_row_q8_0
    takes them: q = round(x * 127 / amax), the block's scale amax / 127 kept in fp16."""
    blocks = xf.reshape(*xf.shape[:-1], -1, spec.group_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True) * ratio
    qmax = 2 ** (spec.bits - 1) - 1
    inverse = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    codes = rnd(blocks * inverse).clamp(-qmax, qmax)
    return codes.reshape(xf.shape), (amax / qmax).half().float()


def fake_quant_activation(
    x: torch.Tensor, spec: ActSpec, clip: torch.Tensor | None = None, ste: bool = False
) -> torch.Tensor:
    """Per-token quantize-dequantize of x [..., K] (see ``quantize_activation``), in x's dtype."""
    if not spec.enabled:
        return x
    codes, scale = quantize_activation(x, spec, clip, ste)
    if spec.group_size is not None:
        return (codes.reshape(*scale.shape[:-1], -1) * scale).reshape(x.shape).to(x.dtype)
    return (codes * scale).to(x.dtype)


def code_matmul(x_codes: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """sum_k x_codes[..., k] * w_codes_t[k, n] * w_scale[group(k), n] -> [..., N], taken as an integer GEMM
    takes it: one product of codes per weight group, scaled afterwards.

    x_codes [..., K] and w_codes_t [K, N] are integer-valued (zero-points already subtracted), w_scale is
    [G, N]. Every partial sum of a group product is an integer, exact in float32 below 2^24 whatever
    order a GEMM adds in.
    """
    groups, (k, n) = w_scale.shape[0], w_codes_t.shape
    if groups == 1:
        return (x_codes @ w_codes_t) * w_scale[0]
    lead = x_codes.shape[:-1]
    per_group = x_codes.reshape(-1, groups, k // groups).transpose(0, 1)  # [G, T, K / G]
    partial = per_group @ w_codes_t.reshape(groups, k // groups, n)  # [G, T, N]
    return (partial * w_scale.unsqueeze(1)).sum(0).reshape(*lead, n)
