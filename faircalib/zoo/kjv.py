"""English outside Wikipedia: the King James Bible from Debian's ``bible-kjv-text`` (public domain, installs
offline from the Debian registry; read through its ``bible`` command), and a text model's masked-token
accuracy on it against the best constant predictor on that same text."""

from __future__ import annotations

import re
import shutil
import subprocess

import torch

from faircalib.errors import ConfigError
from faircalib.zoo.train import eval_windows_of, evaluate_masked

# Eight books of both testaments, law, poetry, prophecy, gospel and letters (book, chapters, verses shown).
BOOKS = ("gen1:1-50:26", "exo1:1-40:38", "psa1:1-150:6", "isa1:1-66:24", "mat1:1-28:20", "joh1:1-21:25",
         "act1:1-28:31", "rom1:1-16:27")  # fmt: skip
VERSE = re.compile(r"^\s*\d+\s+")


def available() -> bool:
    return shutil.which("bible") is not None


def kjv_text(spec: str) -> str:
    """The verses of ``spec`` (e.g. gen1:1-50:26) as running text: chapter headings and verse numbers dropped."""
    if not available():
        raise ConfigError("the King James Bible needs Debian's bible-kjv-text (apt-get install bible-kjv-text)")
    printed = subprocess.run(["bible", "-l10000", spec], check=True, capture_output=True, text=True).stdout
    verses = [VERSE.sub("", line).strip() for line in printed.splitlines() if VERSE.match(line)]
    return " ".join(verses)


@torch.no_grad()
def outside_wikipedia(model, tokenizer, books=BOOKS, window: int = 128, ratio: float = 0.15) -> dict:
    """Masked-token accuracy and NLL at ``ratio`` over every ``window``-token window of ``books`` (seed 1234), and
    the accuracy of always predicting that text's own most frequent token."""
    stream = torch.tensor(tokenizer.encode(" ".join(kjv_text(book) for book in books)))
    windows = eval_windows_of(stream, window)
    scores = evaluate_masked(model, windows, model.spec.mask_token_id, ratio, seed=1234)
    constant = float((windows == torch.bincount(windows.flatten()).argmax()).float().mean())
    return {"text": "KJV " + " ".join(books), "windows": windows.shape[0], "mask_ratio": ratio, **scores,
            "best_constant_accuracy": constant, "ratio_to_constant": scores["accuracy"] / constant}  # fmt: skip
