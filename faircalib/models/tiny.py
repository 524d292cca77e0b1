"""Tiny random checkpoints in the real on-disk layouts, so tests exercise the loader a user's
LLaDA-8B goes through (config.json field names, safetensors key names, sharding)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from faircalib.errors import ConfigError
from faircalib.models.base import Denoiser
from faircalib.models.dream import Dream, DreamConfig
from faircalib.models.llada import LLaDA, LLaDAConfig

TINY_VOCAB = 96
_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_llada_config(**overrides) -> LLaDAConfig:
    fields = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=192,
        vocab_size=TINY_VOCAB,
        embedding_size=TINY_VOCAB,
        rope_theta=10000.0,
        mask_token_id=TINY_VOCAB - 1,
        eos_token_id=1,
        eot_token_id=2,
        max_sequence_length=512,
    )
    return LLaDAConfig(**{**fields, **overrides})


def tiny_dream_config(**overrides) -> DreamConfig:
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=TINY_VOCAB,
        rope_theta=10000.0,
        mask_token_id=TINY_VOCAB - 1,
        eos_token_id=1,
        pad_token_id=1,
        max_position_embeddings=512,
    )
    return DreamConfig(**{**fields, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init with peaked outputs: weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1.

    Drawn on the parameters' device, so an 8B-sized model built on a GPU is filled in seconds; the numbers
    depend on the device's generator.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device)
            if param.ndim == 1:
                value = 1.0 + 0.1 * noise if "norm" in name or "LayerNorm" in name else 0.02 * noise
            elif "embed" in name or "wte" in name or "embeddings" in name:
                value = noise
            else:
                value = noise / math.sqrt(param.shape[1])
            param.copy_(value.to(param.dtype))


def tiny_denoiser(family: str, seed: int = 0) -> Denoiser:
    """A random tiny model of a native family, in memory."""
    if family == LLaDA.family:
        model: Denoiser = LLaDA(tiny_llada_config())
    elif family == Dream.family:
        model = Dream(tiny_dream_config())
    else:
        raise ConfigError(f"no tiny native model for family {family!r}")
    randomize_(model, seed)
    return model.eval()


def write_tiny_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random tiny checkpoint of ``family`` ('llada', 'dream' or 'bert') and return its path.

    ``max_shard_bytes`` splits the weights into model-0000i-of-0000n.safetensors shards plus an index.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        _write_tiny_bert(out_dir, seed, max_shard_bytes, dtype)
    else:
        tiny_denoiser(family, seed).to(dtype).save_pretrained(out_dir, max_shard_bytes)
    return out_dir


def _write_tiny_bert(out_dir: Path, seed: int, max_shard_bytes: int | None, dtype: torch.dtype) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = _BERT_SPECIAL + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    model = BertForMaskedLM(config)
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
    model.to(dtype).save_pretrained(str(out_dir), **kwargs)
    BertTokenizer(vocab=str(out_dir / "vocab.txt"), do_lower_case=False).save_pretrained(str(out_dir))
