"""What a calibration run does, as one frozen, JSON-serialisable config.

A method is a row of data: the fields that make it what it is (``IDENTITY``) and its defaults for each
activation format (``PRESETS``). Every field a caller leaves as None takes the method's preset value for
the config's format, so ``QuantConfig(method="fair", abits=4)`` and ``preset("fair", abits=4)`` are the same
config, every ablation is a field away from a baseline, and the manifest records exactly what ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from faircalib.calib.quant import ActSpec, WeightSpec
from faircalib.errors import ConfigError

FORMATS = {"W4A4": (4, 4), "W4A8": (4, 8), "W4A16": (4, 16), "W8A8": (8, 8)}

# The fields a preset fills: None in a QuantConfig means "the method's value for this format".
DEFAULTS: dict[str, Any] = dict(
    solver="gptq", rotate=False, rotation_steps=0, block_transforms=False, smooth=False, states="teacher",
    weighting="uniform", beta=4.0, w_max=8.0, reconstruct=False,
)  # fmt: skip

# What each method is: a config under its name must keep these (a contradiction names the method it is).
IDENTITY: dict[str, dict[str, Any]] = {
    "rtn": dict(solver="rtn", rotate=False, smooth=False, reconstruct=False, weighting="uniform"),
    "gptq": dict(solver="gptq", rotate=False, smooth=False, reconstruct=False, weighting="uniform", states="teacher"),
    "gptq-text": dict(solver="gptq", rotate=False, smooth=False, reconstruct=False, states="text"),
    "smoothquant": dict(solver="rtn", smooth=True, rotate=False, reconstruct=False, weighting="uniform"),
    "quarot": dict(solver="gptq", rotate=True, rotation_steps=0, smooth=False, reconstruct=False, weighting="uniform"),
    "quarot-rtn": dict(
        solver="rtn", rotate=True, rotation_steps=0, smooth=False, reconstruct=False, weighting="uniform"
    ),
    # the reconstruction step at every format: FAIR-Calib minus the prior ("the uniform twin")
    "gptq-recon": dict(solver="gptq", smooth=False, reconstruct=True, weighting="uniform"),
    "fair": dict(solver="gptq", smooth=False, weighting="prior", states="teacher"),
    "custom": {},  # a config assembled field by field
}
METHODS = tuple(name for name in IDENTITY if name != "custom")

# (method, activation format) -> defaults beyond the method's identity. Why each value: docs/DESIGN.md, "Presets".
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("gptq-recon", "A4"): dict(rotate=True, rotation_steps=100, block_transforms=True),
    ("gptq-recon", "A8"): dict(rotate=True),
    ("gptq-recon", "A8-static"): dict(rotate=True),
    ("fair", "A4"): dict(
        rotate=True, rotation_steps=200, block_transforms=True, beta=16.0, w_max=32.0, reconstruct=True
    ),
    ("fair", "A8"): dict(rotate=True),
    ("fair", "A8-static"): dict(rotate=True, reconstruct=True),
}

# A field left to the preset is dropped with what it needs: no learned rotation without a rotation, no block
# transforms without a learned rotation (so --no-rotate alone turns both off).
_NEEDS = (("rotation_steps", "rotate"), ("block_transforms", "rotation_steps"))

_CHOICES = {
    "solver": ("rtn", "gptq"), "states": ("teacher", "text"), "weighting": ("uniform", "prior"),
    "promote_by": ("flips", "hessian"),
}  # fmt: skip


@dataclass(frozen=True)
class QuantConfig:
    method: str = "fair"
    wbits: int = 4
    abits: int = 16
    group_size: int | None = None  # None: one scale per output channel
    w_symmetric: bool = True
    w_fp16_scales: bool = False  # weight scales rounded to fp16 (GGUF's blocks store them so)
    a_symmetric: bool = True
    a_clip_ratio: float = 1.0
    a_static: bool = False  # one calibrated scale per tensor instead of per-token dynamic (TensorRT INT8)
    a_group_size: int | None = None  # one scale per token and block of inputs (llama.cpp's Q8_0 activations)
    # --- weight solver
    solver: Literal["rtn", "gptq"] | None = None
    damp: float = 0.01
    act_order: bool = True
    # --- transforms
    rotate: bool | None = None  # QuaRot-style randomized Hadamard on the residual stream
    rotation_steps: int | None = None  # a rotation learned on top of it on the output KL; 0 keeps the Hadamard
    rotation_lr: float = 5e-3  # Adam's first step size, decayed to zero on a cosine (as recon_lr)
    rotation_batch: int = 16
    block_transforms: bool | None = None  # per-block transforms learned with the rotation, folded into weights
    smooth: bool | None = None  # SmoothQuant's per-channel migration between each norm and its readers
    smooth_alpha: float = 0.5
    # --- calibration data
    states: Literal["teacher", "text"] | None = None
    n_prompts: int = 32
    states_per_prompt: int = 32
    seed: int = 0
    # --- FAIR-Calib token weights (Stage I)
    weighting: Literal["uniform", "prior"] | None = None
    lam: float = 0.5
    beta: float | None = None
    w_min: float = 1.0
    w_max: float | None = None
    tau: float = 0.02
    # --- reconstruction (Stage II step 3)
    reconstruct: bool | None = None
    recon_steps: int = 200
    recon_lr: float = 5e-3
    recon_batch: int = 8
    head_weight: float = 1.0  # logits-level KL at decision positions, last block only (0 turns it off)
    # --- mixed precision: linears kept at 8 bits (calib/promotion.py)
    promote_budget: float = 0.0  # extra weight bits, percent of the all-wbits linears' (0: none promoted)
    promote_by: Literal["flips", "hessian"] = "flips"
    promote_states: int = 64  # calibration states the linears are scored on

    def __post_init__(self) -> None:
        if self.method not in IDENTITY:
            raise ConfigError(f"method must be one of {', '.join(IDENTITY)}; got {self.method!r}")
        self.weight_spec()  # validates wbits / group_size
        self.act_spec()
        if self.a_static and (self.abits != 8 or not self.a_symmetric):
            raise ConfigError("static activation scales (a_static) take symmetric 8-bit activations (abits 8)")
        given = {name: getattr(self, name) for name in DEFAULTS if getattr(self, name) is not None}
        for name, value in resolve_preset(self.method, self.act_format, given).items():
            object.__setattr__(self, name, value)
        self._validate()
        self._check_identity()

    def _validate(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if not 0 <= self.smooth_alpha <= 1:
            raise ConfigError(f"smooth_alpha must be in [0, 1]; got {self.smooth_alpha}")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"lam must be in [0, 1]; got {self.lam}")
        if self.w_min <= 0 or self.w_max < self.w_min:
            raise ConfigError(f"need 0 < w_min <= w_max; got w_min {self.w_min}, w_max {self.w_max}")
        if self.weighting == "prior" and self.states != "teacher":
            raise ConfigError("prior weighting needs teacher states (states='teacher')")
        if self.rotation_steps and not (self.rotate and self.act_spec().enabled and not self.a_static):
            raise ConfigError("a learned rotation (rotation_steps > 0) needs rotate and dynamic quantized activations")
        if self.block_transforms and not self.rotation_steps:
            raise ConfigError("block transforms are learned with the rotation: they need rotation_steps > 0")
        if self.promote_budget and self.wbits >= 8:
            raise ConfigError(f"promotion keeps linears at 8-bit weights: {self.wbits}-bit weights gain nothing")
        for name in ("n_prompts", "states_per_prompt", "recon_batch", "rotation_batch", "promote_states"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("recon_steps", "rotation_steps", "damp", "head_weight", "beta", "promote_budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0; got {self.tau}")

    def _check_identity(self) -> None:
        for name, value in IDENTITY[self.method].items():
            if getattr(self, name) != value:
                raise ConfigError(
                    f"method {self.method} means {name}={value}, but {name}={getattr(self, name)} was asked for: "
                    "pick the method that does that, or method 'custom'"
                )

    def weight_spec(self) -> WeightSpec:
        return WeightSpec(self.wbits, self.group_size, self.w_symmetric, self.w_fp16_scales)

    def act_spec(self) -> ActSpec:
        return ActSpec(self.abits, self.a_symmetric, self.a_clip_ratio, group_size=self.a_group_size)

    @property
    def format(self) -> str:
        return f"W{self.wbits}A{self.abits}"

    @property
    def act_format(self) -> str:
        """The activation format the presets are keyed by: A4, A8, A8-static, A8-g32 (per-block) or A16."""
        blocks = f"-g{self.a_group_size}" if self.a_group_size else ""
        return f"A{self.abits}" + ("-static" if self.a_static else "") + blocks

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields: {', '.join(unknown)}")
        return cls(**data)


def resolve_preset(method: str, act_format: str, given: dict[str, Any]) -> dict[str, Any]:
    """The preset fields of ``method`` at ``act_format``, with ``given`` (the caller's own values) on top."""
    values = {**DEFAULTS, **IDENTITY.get(method, {}), **PRESETS.get((method, act_format), {})}
    for name, needed in _NEEDS:
        if name not in given and not given.get(needed, values[needed]):
            values[name] = DEFAULTS[name]
    return {**values, **given}


def preset(method: str, **overrides: Any) -> QuantConfig:
    """The config of a named method (``METHODS``); ``overrides`` (e.g. from CLI flags; None means unset) win."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return QuantConfig(method=method, **{k: v for k, v in overrides.items() if v is not None})
