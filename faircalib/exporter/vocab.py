"""A checkpoint's tokenizer as GGUF metadata, so llama.cpp tokenizes as the checkpoint's tokenizer.json does.

llama.cpp reads a byte-level BPE as ``tokenizer.ggml.model`` "gpt2" with a named pre-tokenizer (the regex that
splits text before BPE); faircalib names the two it recognises (GPT-2's and Qwen2's) and refuses others
rather than guess. A checkpoint without tokenizer files (the tests' tiny models) gets placeholder tokens:
llama.cpp then runs on token ids alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faircalib.errors import ConfigError

# Qwen2's split regex (Dream's tokenizer); llama.cpp's "qwen2" pre-tokenizer
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama-diffusion-cli passes every prompt through a chat template (ChatML when the file has none)
PASS_THROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def pre_tokenizer(config: dict[str, Any]) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer."""
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    splits = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    if splits == [QWEN2_PATTERN] and "ByteLevel" in kinds:
        return "qwen2"
    raise ConfigError(
        f"llama.cpp needs the name of this tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}); faircalib "
        "knows GPT-2's byte-level one and Qwen2's"
    )


def bpe_vocabulary(path: Path, n_vocab: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer) of a byte-level BPE tokenizer.json, padded to ``n_vocab``."""
    import gguf

    config = json.loads(path.read_text())
    if config.get("model", {}).get("type") != "BPE":
        raise ConfigError(f"{path} is not a BPE tokenizer: llama.cpp's loaders for LLaDA and Dream read BPE")
    by_id = {i: token for token, i in config["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in config.get("added_tokens", [])}
    by_id.update({i: entry["content"] for i, entry in added.items()})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = added.get(i, {}).get("special")
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED if i in added else None
            types.append(kind or gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in config["model"].get("merges", [])]
    return tokens, types, merges, pre_tokenizer(config)


def placeholder_vocabulary(n_vocab: int, special: dict[str, int]) -> tuple[list[str], list[int], list[str], str]:
    """Tokens for a checkpoint without a tokenizer: runs on ids, and llama.cpp's BPE loader wants one merge."""
    import gguf

    names = {i: f"<|{kind}|>" for kind, i in special.items()}
    tokens = [names.get(i, f"t{i}") for i in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if i in names else gguf.TokenType.NORMAL for i in range(n_vocab)]
    normal = [t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.NORMAL]
    return tokens, types, [f"{normal[0]} {normal[1]}"], "gpt-2"


def gguf_vocabulary(writer, source: Path | None, n_vocab: int, special: dict[str, int]) -> None:
    """Write the tokenizer of the checkpoint at ``source`` (or placeholders) and its special ids to ``writer``."""
    path = Path(source) / "tokenizer.json" if source is not None else None
    if path is not None and path.is_file():
        tokens, types, merges, pre = bpe_vocabulary(path, n_vocab)
    else:
        tokens, types, merges, pre = placeholder_vocabulary(n_vocab, special)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, token in special.items():
        getattr(writer, f"add_{kind}_token_id")(token)
    settings = tokenizer_settings(source)
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    writer.add_add_eos_token(False)
    template = settings.get("chat_template")
    writer.add_chat_template(template if isinstance(template, str) else PASS_THROUGH_TEMPLATE)


def tokenizer_settings(source: Path | None) -> dict[str, Any]:
    """The checkpoint's tokenizer_config.json (whether it adds a BOS, an instruct model's chat template)."""
    path = Path(source) / "tokenizer_config.json" if source is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
