"""Masked-token accuracy of a text model on English outside Wikipedia: the King James Bible from Debian's
``bible-kjv-text`` (read through its ``bible`` command; public domain, installs offline from the Debian
registry), against the best constant predictor on that same text.

    apt-get install bible-kjv-text
    python benchmarks/ood_text.py [--model faircalib/zoo/llada-wiki-tiny] [--books gen1:1-50:26 mat1:1-28:20]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

import torch

from faircalib.models import load_denoiser, load_tokenizer
from faircalib.zoo import model_dir
from faircalib.zoo.train import eval_windows_of, evaluate_masked

VERSE = re.compile(r"^\s*\d+\s+")


def kjv_text(spec: str) -> str:
    """The verses of ``spec`` (e.g. gen1:1-50:26) as running text: chapter headings and verse numbers dropped."""
    printed = subprocess.run(["bible", "-l10000", spec], check=True, capture_output=True, text=True).stdout
    verses = [VERSE.sub("", line).strip() for line in printed.splitlines() if VERSE.match(line)]
    return " ".join(verses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(model_dir()))
    parser.add_argument("--books", nargs="+", default=["gen1:1-50:26", "psa1:1-150:6", "mat1:1-28:20"])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.15)
    args = parser.parse_args()
    if shutil.which("bible") is None:
        print("needs Debian's bible-kjv-text (apt-get install bible-kjv-text)", file=sys.stderr)
        return 2
    model, tokenizer = load_denoiser(args.model), load_tokenizer(args.model)
    stream = torch.tensor(tokenizer.encode(" ".join(kjv_text(book) for book in args.books)))
    windows = eval_windows_of(stream, args.window)
    with torch.no_grad():
        scores = evaluate_masked(model, windows, model.spec.mask_token_id, args.ratio, seed=1234)
    constant = float((windows == torch.bincount(windows.flatten()).argmax()).float().mean())
    row = {"model": args.model, "text": "KJV " + " ".join(args.books), "windows": windows.shape[0],
           "mask_ratio": args.ratio, **scores, "best_constant_accuracy": constant,
           "ratio_to_constant": scores["accuracy"] / constant}  # fmt: skip
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
