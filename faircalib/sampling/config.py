"""Decoding settings of the two reference samplers, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from faircalib.errors import ConfigError

Remasking = Literal["low_confidence", "random", "left_to_right"]
DreamAlg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]
REMASKING = ("low_confidence", "random", "left_to_right")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LLaDASampling:
    """ML-GSAI/LLaDA ``generate``: semi-autoregressive blocks, low-confidence or random remasking.

    Defaults are the reference function's (gen 128, one block, 128 steps, greedy).
    """

    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Remasking = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self) -> None:
        _positive(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps)
        if self.gen_length % self.block_length:
            raise ConfigError(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        if self.steps % self.num_blocks:
            raise ConfigError(
                f"steps {self.steps} is not a multiple of the number of blocks {self.num_blocks} "
                f"(gen_length {self.gen_length} / block_length {self.block_length})"
            )
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise ConfigError(f"remasking must be one of {', '.join(REMASKING)}; got {self.remasking!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def to_json_dict(self) -> dict[str, Any]:
        return {"sampler": "llada", **asdict(self)}


@dataclass(frozen=True)
class DreamSampling:
    """Dream ``diffusion_generate``: one block, timesteps linspace(1, eps, steps + 1).

    Defaults are DreamGenerationConfig's (alg 'origin', greedy tokens, eps 1e-3), with 128 new tokens.
    """

    gen_length: int = 128
    steps: int = 128
    eps: float = 1e-3
    alg: DreamAlg = "origin"
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        _positive(gen_length=self.gen_length, steps=self.steps)
        if self.alg not in DREAM_ALGS:
            raise ConfigError(f"alg must be one of {', '.join(DREAM_ALGS)}; got {self.alg!r}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps must be in (0, 1), got {self.eps}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ConfigError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def block_length(self) -> int:
        return self.gen_length

    def to_json_dict(self) -> dict[str, Any]:
        return {"sampler": "dream", **asdict(self)}


Sampling = LLaDASampling | DreamSampling


def sampling_from_json_dict(data: dict[str, Any]) -> Sampling:
    fields = dict(data)
    kind = fields.pop("sampler", None)
    cls = {"llada": LLaDASampling, "dream": DreamSampling}.get(kind)
    if cls is None:
        raise ConfigError(f"unknown sampler {kind!r} (expected 'llada' or 'dream')")
    try:
        return cls(**fields)
    except TypeError as err:
        raise ConfigError(f"bad {kind} sampling settings: {err}") from None
