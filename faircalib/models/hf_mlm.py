"""BERT-family masked LMs (BertForMaskedLM, RobertaForMaskedLM, ...) used as discrete-diffusion denoisers.

A masked LM is exactly a denoiser: same sampler as LLaDA, mask token = the tokenizer's [MASK].
The model itself comes from transformers; this adapter only exposes embed -> blocks -> head.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.models.base import BlockContext, Denoiser, DenoiserSpec
from faircalib.models.tokenizer import load_tokenizer

_LINEAR_GROUPS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


class HFMaskedLM(Denoiser):
    family = "hf_mlm"

    def __init__(self, mlm: nn.Module, mask_token_id: int, eos_token_ids: tuple[int, ...]):
        super().__init__()
        self.mlm = mlm
        base = mlm.base_model
        encoder = getattr(base, "encoder", None)
        if encoder is None or not hasattr(encoder, "layer") or not hasattr(base, "embeddings"):
            raise CheckpointError(
                f"{type(mlm).__name__} does not have the BERT layout (embeddings, encoder.layer): not supported"
            )
        heads = [module for module in mlm.children() if module is not base]
        if len(heads) != 1:
            raise CheckpointError(f"cannot identify the MLM head of {type(mlm).__name__}")
        self._head = heads[0]
        for name in (n for group in _LINEAR_GROUPS for n in group):
            if not isinstance(encoder.layer[0].get_submodule(name), nn.Linear):
                raise CheckpointError(f"{type(mlm).__name__} layer has no linear '{name}'")
        self.spec = DenoiserSpec(
            family=self.family,
            mask_token_id=mask_token_id,
            eos_token_ids=eos_token_ids,
            vocab_size=mlm.config.vocab_size,
            logit_shift=False,
            sampler="llada",
        )

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        """A *ForMaskedLM architecture, or a model type transformers has a masked-LM class for: AntiBERTy
        declares its own architecture name over a plain BERT masked LM (plus heads the MLM ignores)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if any(str(arch).endswith("ForMaskedLM") for arch in config.get("architectures") or ()):
            return True
        return config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, config: dict[str, Any], dtype: torch.dtype, device: str | torch.device
    ) -> HFMaskedLM:
        from transformers import AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # loading takes a moment; a bar of its own would break --quiet
        try:
            mlm = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=dtype)
        except Exception as err:  # transformers raises OSError/ValueError/RuntimeError for broken checkpoints
            raise CheckpointError(f"cannot load the masked LM in {model_dir}: {err}") from None
        tokenizer = load_tokenizer(model_dir)
        mask_id = config.get("mask_token_id")
        if mask_id is None and tokenizer is not None:
            mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise CheckpointError(
                f"{model_dir}: no mask token (no mask_token_id in config.json and no tokenizer with one)"
            )
        end = config.get("eos_token_id")
        if end is None:
            end = getattr(tokenizer, "sep_token_id", None)
        return cls(mlm.to(device), int(mask_id), (int(end),) if end is not None else ()).eval()

    def save_pretrained(self, out_dir: Path, max_shard_bytes: int | None = None) -> None:
        kwargs = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
        # These ids usually live only in the tokenizer, which is not saved here: keep them with the model.
        self.mlm.config.mask_token_id = self.spec.mask_token_id
        self.mlm.config.eos_token_id = self.spec.eos_token_ids[0] if self.spec.eos_token_ids else None
        self.mlm.save_pretrained(str(out_dir), **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlm.base_model.embeddings(input_ids=input_ids)

    def block_context(self, input_ids: torch.Tensor) -> BlockContext:
        return BlockContext()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.mlm.base_model.encoder.layer

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        out = block(hidden, attention_mask=ctx.attention_bias)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden)

    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        return _LINEAR_GROUPS
