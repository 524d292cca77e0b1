"""How calibration time and host memory grow with the number of blocks and of calibration prompts, on the CPU.

The bundled model cut to its first k blocks (real weights and tokenizer), calibrated with FAIR-Calib W4A4 on
the benchmark's schedule (gen 32, blocks of 8, 32 steps), each run in a process of its own:

    python benchmarks/calib_growth.py --out runs/calib-growth [--blocks 2 4 8] [--prompts 8 16 32]

Writes ``growth.json`` (rewritten after each run) with Stage I / Stage II seconds and the host peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from faircalib.models import load_denoiser
from faircalib.zoo import model_dir


def cut_model(blocks: int, out: Path) -> Path:
    """The bundled model's first ``blocks`` blocks as a checkpoint directory of its own."""
    if (out / "config.json").is_file():
        return out
    model = load_denoiser(model_dir())
    del model.blocks[blocks:]
    model.config = dataclasses.replace(model.config, n_layers=blocks)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir() / name, out / name)
    return out


def calibrate(model: Path, prompts: int, out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "faircalib", "calibrate", "--model", str(model), "--method", "fair",
                    "--wbits", "4", "--abits", "4", "--n-prompts", str(prompts), "--gen-length", "32",
                    "--block-length", "8", "--steps", "32", "--out", str(out), "--overwrite", "--quiet"],
                   check=True)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - start, 1),
            "timings": {k: round(v, 1) for k, v in manifest["timings"].items()},
            "host_peak_mb": round(manifest["peak_memory_mb"])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # every block count at the middle prompt count, every prompt count at the most blocks
    grid = [(b, args.prompts[len(args.prompts) // 2]) for b in args.blocks]
    grid += [(args.blocks[-1], p) for p in args.prompts if (args.blocks[-1], p) not in grid]
    rows = []
    for blocks, prompts in grid:
        model = cut_model(blocks, args.out / f"model-{blocks}b")
        artifact = args.out / f"art-{blocks}b-{prompts}p"
        row = {"blocks": blocks, "prompts": prompts, **calibrate(model, prompts, artifact)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "growth.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
