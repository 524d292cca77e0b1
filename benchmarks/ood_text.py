"""Masked-token accuracy of a text model on English outside Wikipedia (the King James Bible, ``faircalib.zoo.kjv``)
against the best constant predictor on that same text.

    apt-get install bible-kjv-text
    python benchmarks/ood_text.py [--model faircalib/zoo/llada-wiki-tiny] [--books gen1:1-50:26 mat1:1-28:20]
"""

from __future__ import annotations

import argparse
import json
import sys

from faircalib.models import load_denoiser, load_tokenizer
from faircalib.zoo import kjv, model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(model_dir()))
    parser.add_argument("--books", nargs="+", default=list(kjv.BOOKS))
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.15)
    args = parser.parse_args()
    if not kjv.available():
        print("needs Debian's bible-kjv-text (apt-get install bible-kjv-text)", file=sys.stderr)
        return 2
    model, tokenizer = load_denoiser(args.model), load_tokenizer(args.model)
    row = kjv.outside_wikipedia(model, tokenizer, args.books, args.window, args.ratio)
    print(json.dumps({"model": args.model, **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
