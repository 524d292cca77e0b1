"""Dream (Dream-org/Dream-v0-*-7B): the Qwen2.5 layout (GQA, q/k/v biases) with bidirectional attention.

Dream predicts token i from hidden state i-1; that shift lives in the sampler (``spec.logit_shift``)
so that the exported graph stays one plain forward pass.
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
class DreamConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    bos_token_id: int | None = None
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError("hidden_size is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads is not divisible by num_key_value_heads")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise CheckpointError(f"mask_token_id {self.mask_token_id} outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json_dict(cls, config: dict[str, Any]) -> DreamConfig:
        if config.get("tie_word_embeddings", False):
            raise CheckpointError("Dream config with tie_word_embeddings=true is not supported")
        heads = config_field(config, "num_attention_heads", int)
        return cls(
            hidden_size=config_field(config, "hidden_size", int),
            num_hidden_layers=config_field(config, "num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=config_field(config, "num_key_value_heads", int, heads),
            intermediate_size=config_field(config, "intermediate_size", int),
            vocab_size=config_field(config, "vocab_size", int),
            rms_norm_eps=config_field(config, "rms_norm_eps", float, 1e-6),
            rope_theta=config_field(config, "rope_theta", float, 1e6),
            mask_token_id=config_field(config, "mask_token_id", int, 151666),
            eos_token_id=config_field(config, "eos_token_id", int, 151643),
            pad_token_id=config_field(config, "pad_token_id", int, 151643),
            bos_token_id=config_field(config, "bos_token_id", int, None),
            max_position_embeddings=config_field(config, "max_position_embeddings", int, 131072),
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            **asdict(self),
        }


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), ctx.rope_cos, ctx.rope_sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), ctx.rope_cos, ctx.rope_sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        return self.o_proj(merge_heads(bidirectional_attention(q, k, v, ctx.attention_bias)))


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down_input = nn.Identity()  # becomes an online Hadamard when the model is rotated

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.down_input(F.silu(self.gate_proj(h)) * self.up_proj(h)))


class DreamLayer(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Model(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Dream(NativeDenoiser):
    family = "dream"
    embedding_key = "model.embed_tokens.weight"

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.model = _Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.spec = DenoiserSpec(
            family=self.family,
            mask_token_id=cfg.mask_token_id,
            eos_token_ids=(cfg.eos_token_id,),
            vocab_size=cfg.vocab_size,
            logit_shift=True,
            sampler="dream",
        )

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() == "dream" or "DreamModel" in config.get("architectures", ())

    @classmethod
    def config_from_checkpoint(cls, config: dict[str, Any], embedding_rows: int | None) -> DreamConfig:
        cfg = DreamConfig.from_json_dict(config)
        if embedding_rows is not None and embedding_rows != cfg.vocab_size:
            raise CheckpointError(
                f"{cls.embedding_key} has {embedding_rows} rows but config.json says vocab_size {cfg.vocab_size}"
            )
        return cfg

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def block_context(self, input_ids: torch.Tensor) -> BlockContext:
        cos, sin = rope_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device)
        return BlockContext(rope_cos=cos, rope_sin=sin)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return block(hidden, ctx)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        return (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        )

    def rotation_layout(self) -> RotationLayout:
        return RotationLayout(
            embedding="model.embed_tokens",
            final_norm="model.norm",
            head="lm_head",
            norm_readers=(
                ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ),
            writers=("self_attn.o_proj", "mlp.down_proj"),
            ffn_down="mlp.down_proj",
            ffn_down_input="mlp.down_input",
            value="self_attn.v_proj",
            attn_out="self_attn.o_proj",
            ffn_up="mlp.up_proj",
            query_heads=self.config.num_attention_heads,
            value_heads=self.config.num_key_value_heads,
        )

    def gguf_layout(self) -> GGUFLayout:
        cfg = self.config
        hparams = {
            "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads,
            "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.rms_norm_eps,
        }  # fmt: skip
        tokens = {"eos": cfg.eos_token_id, "mask": cfg.mask_token_id, "pad": cfg.pad_token_id, "bos": cfg.bos_token_id}
        return GGUFLayout("dream", hparams, True, {}, {k: v for k, v in tokens.items() if v is not None})
