"""Host peak of an export against the checkpoint and the bundle it writes.

A LLaDA whose linears dominate (random weights; default 4 blocks of d_model 2048, FFN 5632, vocabulary 4096:
0.89 GB in fp32) and its RTN W4A16 artifact (groups of 128) are written once; then each profile is exported
in a fresh process, which reports its own resident high-water mark; as `faircalib export` does it (the loaded
model consumed) and, with --keep-model, as the Python API does by default (the model left as it is):

    python benchmarks/export_memory.py --work /tmp/export-memory --profiles ort-w4a16 ort-fp32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from faircalib.api import calibrate_to, export
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import preset
from faircalib.calib.runner import host_peak_mb
from faircalib.models import load_denoiser
from faircalib.models.llada import LLaDA
from faircalib.models.tiny import randomize_, tiny_llada_config
from faircalib.sampling import LLaDASampling


def write_model(work: Path, blocks: int, d_model: int, ffn: int) -> None:
    if (work / "art" / "manifest.json").is_file():
        return
    cfg = tiny_llada_config(d_model=d_model, n_heads=d_model // 128, n_kv_heads=d_model // 128, n_layers=blocks,
                            mlp_hidden_size=ffn, vocab_size=4096, embedding_size=4096)  # fmt: skip
    model = LLaDA(cfg)
    randomize_(model, 0)
    model.save_pretrained(work / "ckpt")
    del model
    artifact = preset("rtn", wbits=4, abits=16, group_size=128, n_prompts=2)
    sampling = LLaDASampling(gen_length=8, block_length=8, steps=8)
    calibrate_to(
        work / "art", load_denoiser(work / "ckpt"), artifact, [[5, 6, 7], [8, 9, 10]], sampling, overwrite=True
    )


def export_one(work: Path, profile: str, consume: bool) -> dict:
    """In this process: export, then report."""
    start = time.perf_counter()
    artifact = None if profile.endswith("fp32") else QuantArtifact.load(work / "art")
    export(load_denoiser(work / "ckpt"), artifact, profile, work / profile, overwrite=True, consume=consume)
    checkpoint = sum(f.stat().st_size for f in (work / "ckpt").glob("*.safetensors"))
    bundle = sum(f.stat().st_size for f in (work / profile).iterdir())
    peak = host_peak_mb()
    return {"profile": profile, "model": "consumed" if consume else "kept",
            "seconds": round(time.perf_counter() - start, 1), "checkpoint_gb": checkpoint / 1e9,
            "bundle_gb": bundle / 1e9, "host_peak_mb": round(peak),
            "peak_over_checkpoint_and_bundle": round(peak * 2**20 / (checkpoint + bundle), 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=["ort-w4a16", "ort-fp32"])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--keep-model", action="store_true", help="also export leaving the loaded model as it is")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: export this profile and print its row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(export_one(args.work, args.one, consume=not args.keep_model)))
        return 0
    torch.manual_seed(0)
    write_model(args.work, args.blocks, args.d_model, args.ffn)
    rows = []
    for profile in args.profiles:
        for keep in (False, True) if args.keep_model else (False,):
            child = [sys.executable, __file__, "--work", str(args.work), "--one", profile, *["--keep-model"] * keep]
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    (args.work / "export_memory.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
