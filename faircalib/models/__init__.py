"""Model families behind one adapter (``Denoiser``), loaded from local checkpoint directories."""

from __future__ import annotations

from pathlib import Path

import torch

from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import streaming
from faircalib.models.base import BlockContext, Denoiser, DenoiserSpec
from faircalib.models.checkpoint import read_config
from faircalib.models.dream import Dream, DreamConfig
from faircalib.models.hf_mlm import HFMaskedLM
from faircalib.models.llada import LLaDA, LLaDAConfig
from faircalib.models.tokenizer import load_tokenizer

FAMILIES: tuple[type[Denoiser], ...] = (LLaDA, Dream, HFMaskedLM)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def family_of(config: dict) -> type[Denoiser]:
    """The adapter class whose ``matches`` accepts this config.json."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    declared = config.get("model_type") or config.get("architectures") or "nothing"
    raise CheckpointError(
        f"unknown model family (config.json declares {declared!r}); supported: LLaDA (model_type 'llada'), "
        "Dream (model_type 'Dream') and masked LMs (*ForMaskedLM, or a model_type transformers has one for)"
    )


def load_denoiser(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    stream_blocks: bool = False,
) -> Denoiser:  # fmt: skip
    """Load any supported checkpoint directory in eval mode, its weights frozen (calibration learns its own
    parameters, never the model's). ``model.source`` remembers the directory (tokenizer, fingerprint).
    ``stream_blocks``: the blocks stay in host memory and visit ``device`` while they run (``models.streaming``)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = family_of(config).from_pretrained(model_dir, config, dtype, "cpu" if stream_blocks else device)
    model.requires_grad_(False)
    model.source = model_dir
    check_finite(model, model_dir)
    return streaming.stream_blocks(model, device) if stream_blocks else model


def check_finite(model: Denoiser, model_dir: Path) -> None:
    """Refuse a checkpoint with NaN or infinite weights (in the dtype loaded), naming the tensor: every
    computation downstream would run and produce garbage without a word."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{model_dir}: tensor {name} holds NaN or infinite values")


__all__ = [
    "FAMILIES",
    "BlockContext",
    "Denoiser",
    "DenoiserSpec",
    "Dream",
    "DreamConfig",
    "HFMaskedLM",
    "LLaDA",
    "LLaDAConfig",
    "family_of",
    "load_denoiser",
    "load_tokenizer",
    "parse_dtype",
]
