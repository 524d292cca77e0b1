"""The adapter every model family implements: embed -> blocks -> head.

Calibration streams one block at a time, so it never calls ``forward`` on the whole model: it calls
``embed`` once, then ``run_block`` block by block with the ``BlockContext`` from ``block_context``,
then ``head``. ``forward`` is exactly that composition, which keeps the two paths identical.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from faircalib.files import write_json_atomic
from faircalib.models.checkpoint import TensorSource, write_safetensors

SamplerKind = Literal["llada", "dream"]


@dataclass(frozen=True)
class DenoiserSpec:
    """What a sampler, exporter or runtime needs to know about a denoiser, independent of its family.

    ``logit_shift``: the model predicts token i from position i-1 (Dream); the sampler shifts logits.
    ``sampler``: which reference decoding algorithm the family ships with.
    """

    family: str
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    logit_shift: bool
    sampler: SamplerKind


@dataclass(frozen=True)
class BlockContext:
    """Per-forward inputs shared by every block: rotary tables and an optional additive attention bias."""

    rope_cos: torch.Tensor | None = None  # [L, head_dim]
    rope_sin: torch.Tensor | None = None  # [L, head_dim]
    attention_bias: torch.Tensor | None = None  # broadcastable to [B, heads, L, L]


@dataclass(frozen=True)
class RotationLayout:
    """Where a pre-norm (RMSNorm) model reads and writes its residual stream, so an orthogonal rotation
    can be folded into the weights (QuaRot). Names are relative to the model, or to a block for the
    per-block fields."""

    embedding: str
    final_norm: str
    head: str
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, the linears reading its output)
    writers: tuple[str, ...]  # linears whose output is added to the residual
    ffn_down: str
    ffn_down_input: str  # the module applied to the down projection's input (Identity until rotated)
    # Where per-block transforms fold exactly (learned on top of the rotation): the value projection's
    # output heads into the attention output projection's input columns, and the FFN's linear branch
    # (whose output multiplies the gate elementwise) into the down projection's input columns.
    value: str
    attn_out: str
    ffn_up: str
    query_heads: int
    value_heads: int  # each value head serves query_heads // value_heads query heads (grouped-query attention)


@dataclass(frozen=True)
class GGUFLayout:
    """What llama.cpp's loader for this family reads from a GGUF file besides the tensors (whose names follow
    from the official checkpoint keys): its architecture, hyper-parameters and special tokens."""

    arch: str  # general.architecture, e.g. "llada"
    hparams: dict[str, int | float]  # context_length, embedding_length, block_count, feed_forward_length, ...
    shift_logits: bool  # the logits at j - 1 decide position j (llama.cpp's diffusion.shift_logits)
    # block-relative weights whose output rows llama.cpp's rotary embedding reads as adjacent pairs, where the
    # checkpoint splits them in halves, with their head counts: their rows are reordered on export
    rope_pairs: dict[str, int]
    special_tokens: dict[str, int]  # eos, mask, pad, eot ... token ids


class Denoiser(nn.Module, ABC):
    """A bidirectional transformer that maps token ids [B, L] to logits [B, L, V]."""

    family: ClassVar[str]
    spec: DenoiserSpec
    source: Path | None = None  # the checkpoint directory it was loaded from (tokenizer files, fingerprint)

    @classmethod
    @abstractmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        """Whether a checkpoint's config.json belongs to this family."""

    @classmethod
    @abstractmethod
    def from_pretrained(
        cls, model_dir: Path, config: dict[str, Any], dtype: torch.dtype, device: str | torch.device
    ) -> Denoiser:
        """Load a checkpoint directory whose config.json (already parsed) this family ``matches``."""

    @abstractmethod
    def save_pretrained(self, out_dir: Path, max_shard_bytes: int | None = None) -> None:
        """Write the checkpoint in the family's official on-disk layout."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int64 -> hidden states [B, L, D]."""

    @abstractmethod
    def block_context(self, input_ids: torch.Tensor) -> BlockContext:
        """The per-forward tensors every block needs (positions, attention bias)."""

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""

    @abstractmethod
    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """One block: [B, L, D] -> [B, L, D]."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [B, L, D] -> logits [B, L, V]."""

    @abstractmethod
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """Names (relative to a block) of its linear layers, grouped by the input they share.

        Calibration accumulates one Hessian per group, e.g. (q, k, v) share the normed residual.
        """

    def rotation_layout(self) -> RotationLayout | None:
        """None for families whose blocks an orthogonal rotation does not commute with (post-LN)."""
        return None

    def gguf_layout(self) -> GGUFLayout | None:
        """None for families llama.cpp has no loader for."""
        return None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        ctx = self.block_context(input_ids)
        for block in self.blocks:
            hidden = self.run_block(block, hidden, ctx)
        return self.head(hidden)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class NativeDenoiser(Denoiser):
    """A family implemented here whose module names are the official checkpoint keys (LLaDA, Dream)."""

    embedding_key: ClassVar[str]
    config: Any  # the family's frozen config dataclass

    @classmethod
    @abstractmethod
    def config_from_checkpoint(cls, config: dict[str, Any], embedding_rows: int | None) -> Any:
        """Parse config.json; ``embedding_rows`` is the embedding tensor's row count, when present."""

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, config: dict[str, Any], dtype: torch.dtype, device: str | torch.device
    ) -> Denoiser:
        source = TensorSource.open(model_dir)
        rows = source.shape(cls.embedding_key)[0] if cls.embedding_key in source.files else None
        cfg = cls.config_from_checkpoint(config, rows)
        with torch.device("meta"):
            model = cls(cfg)
        source.load_into(model, dtype, device)
        return model.eval()

    def save_pretrained(self, out_dir: Path, max_shard_bytes: int | None = None) -> None:
        write_safetensors(self.state_dict(), out_dir, max_shard_bytes)
        write_json_atomic(out_dir / "config.json", self.config.to_json_dict())
