"""LLaDA (GSAI-ML/LLaDA-8B-Base / -Instruct): a Llama-style block with fully bidirectional attention.

Module names mirror the official checkpoint keys (``model.transformer.blocks.{i}.q_proj.weight`` ...)
so a real checkpoint directory loads with no key remapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.models.base import BlockContext, DenoiserSpec, GGUFLayout, NativeDenoiser, RotationLayout
from faircalib.models.checkpoint import config_field
from faircalib.models.layers import (
    RMSNorm,
    apply_rope,
    bidirectional_attention,
    merge_heads,
    rope_tables,
    split_heads,
)


@dataclass(frozen=True)
class LLaDAConfig:
    """The fields of LLaDA's config.json this implementation reads (official names)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    eot_token_id: int | None = 126348
    max_sequence_length: int = 4096

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise CheckpointError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            raise CheckpointError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise CheckpointError(f"mask_token_id {self.mask_token_id} outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_json_dict(cls, config: dict[str, Any]) -> LLaDAConfig:
        for flag, wanted in (("include_bias", False), ("weight_tying", False)):
            if config.get(flag, wanted) != wanted:
                raise CheckpointError(f"LLaDA config with {flag}={config[flag]} is not supported")
        if config.get("block_type", "llama") != "llama":
            raise CheckpointError(f"LLaDA block_type {config['block_type']!r} is not supported (only 'llama')")
        vocab = config_field(config, "vocab_size", int)
        n_heads = config_field(config, "n_heads", int)
        return cls(
            d_model=config_field(config, "d_model", int),
            n_layers=config_field(config, "n_layers", int),
            n_heads=n_heads,
            n_kv_heads=config_field(config, "n_kv_heads", int, n_heads),
            mlp_hidden_size=config_field(config, "mlp_hidden_size", int),
            vocab_size=vocab,
            embedding_size=config_field(config, "embedding_size", int, vocab),
            rope_theta=config_field(config, "rope_theta", float, 500000.0),
            rms_norm_eps=config_field(config, "rms_norm_eps", float, 1e-5),
            mask_token_id=config_field(config, "mask_token_id", int, 126336),
            eos_token_id=config_field(config, "eos_token_id", int, 126081),
            eot_token_id=config_field(config, "eot_token_id", int, None),
            max_sequence_length=config_field(config, "max_sequence_length", int, 4096),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """config.json in the official layout (the fields the remote code needs to load it too)."""
        fields = asdict(self)
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "activation_type": "silu",
            "block_type": "llama",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "include_bias": False,
            "include_qkv_bias": False,
            "weight_tying": False,
            "alibi": False,
            "pad_token_id": self.eos_token_id,
            **fields,
        }


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate: SiLU is applied to it
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)
        self.down_input = nn.Identity()  # becomes an online Hadamard when the model is rotated

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        h = self.attn_norm(x)
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), ctx.rope_cos, ctx.rope_sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), ctx.rope_cos, ctx.rope_sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        x = x + self.attn_out(merge_heads(bidirectional_attention(q, k, v, ctx.attention_bias)))
        h = self.ff_norm(x)
        return x + self.ff_out(self.down_input(F.silu(self.ff_proj(h)) * self.up_proj(h)))


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class _Model(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = _Transformer(cfg)


class LLaDA(NativeDenoiser):
    family = "llada"
    embedding_key = "model.transformer.wte.weight"

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = _Model(cfg)
        eos = (cfg.eos_token_id,) + ((cfg.eot_token_id,) if cfg.eot_token_id is not None else ())
        self.spec = DenoiserSpec(
            family=self.family,
            mask_token_id=cfg.mask_token_id,
            eos_token_ids=eos,
            vocab_size=cfg.embedding_size,
            logit_shift=False,
            sampler="llada",
        )

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "llada" or "LLaDAModelLM" in config.get("architectures", ())

    @classmethod
    def config_from_checkpoint(cls, config: dict[str, Any], embedding_rows: int | None) -> LLaDAConfig:
        if embedding_rows is not None:
            # The released checkpoints pad the embedding beyond vocab_size: trust the tensor.
            config = {**config, "embedding_size": embedding_rows}
        return LLaDAConfig.from_json_dict(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(input_ids)

    def block_context(self, input_ids: torch.Tensor) -> BlockContext:
        cos, sin = rope_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device)
        return BlockContext(rope_cos=cos, rope_sin=sin)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return block(hidden, ctx)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.ff_out(self.model.transformer.ln_f(hidden))

    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        return (("q_proj", "k_proj", "v_proj"), ("attn_out",), ("ff_proj", "up_proj"), ("ff_out",))

    def rotation_layout(self) -> RotationLayout:
        return RotationLayout(
            embedding="model.transformer.wte",
            final_norm="model.transformer.ln_f",
            head="model.transformer.ff_out",
            norm_readers=(("attn_norm", ("q_proj", "k_proj", "v_proj")), ("ff_norm", ("ff_proj", "up_proj"))),
            writers=("attn_out", "ff_out"),
            ffn_down="ff_out",
            ffn_down_input="down_input",
            value="v_proj",
            attn_out="attn_out",
            ffn_up="up_proj",
            query_heads=self.config.n_heads,
            value_heads=self.config.n_kv_heads,
        )

    def gguf_layout(self) -> GGUFLayout:
        cfg = self.config
        hparams = {
            "context_length": cfg.max_sequence_length, "embedding_length": cfg.d_model, "block_count": cfg.n_layers,
            "feed_forward_length": cfg.mlp_hidden_size, "head_count": cfg.n_heads, "head_count_kv": cfg.n_kv_heads,
            "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.rms_norm_eps,
        }  # fmt: skip
        tokens = {"eos": cfg.eos_token_id, "mask": cfg.mask_token_id, "eot": cfg.eot_token_id}
        pairs = {"q_proj.weight": cfg.n_heads, "k_proj.weight": cfg.n_kv_heads}  # llama.cpp's "normal" rope
        return GGUFLayout("llada", hparams, False, pairs, {k: v for k, v in tokens.items() if v is not None})
