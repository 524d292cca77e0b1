"""Tokenizer lookup for a checkpoint directory. A model without tokenizer files still runs on ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from faircalib.errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def find_vocab_txt(model_dir: Path) -> Path | None:
    """A WordPiece vocab.txt in the directory or beside it (AntiBERTy ships it one level up)."""
    for candidate in (model_dir / "vocab.txt", model_dir.parent / "vocab.txt"):
        if candidate.is_file():
            return candidate
    return None


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The directory's Hugging Face tokenizer, a BertTokenizer over a vocab.txt, or None if neither.

    Remote code is never run (no trust_remote_code): transformers then loads a tokenizer_config.json
    that names a custom class (Dream's does) from its tokenizer.json.
    """
    from transformers import AutoTokenizer, BertTokenizer

    model_dir = Path(model_dir)
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        # transformers warns loudly about remote code and missing fast versions; the errors still raise.
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            return AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as err:  # transformers raises many unrelated types for a broken tokenizer
            raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {err}") from None
    vocab = find_vocab_txt(model_dir)
    if vocab is not None:
        return BertTokenizer(vocab=str(vocab), do_lower_case=False)
    return None


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own specials at the front (e.g. [CLS], BOS) but none
    that would tell the denoiser the text is already over ([SEP] / EOS at the end)."""
    ids = list(tokenizer(text)["input_ids"])
    end_markers = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    while ids and ids[-1] in end_markers:
        ids.pop()
    return ids
