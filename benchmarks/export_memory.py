"""Host peak of an export against the checkpoint and the bundle it writes.

A LLaDA whose linears dominate (random weights; default 4 blocks of d_model 2048, FFN 5632, vocabulary 4096:
0.89 GB in fp32) and its RTN W4A16 artifact (groups of 128) are written once; then each profile is exported
in a fresh process, which reports its own resident high-water mark; as `faircalib export` does it (the loaded
model consumed) and, with --keep-model, as the Python API does by default (the model left as it is):

    python benchmarks/export_memory.py --work /tmp/export-memory --profiles ort-w4a16 ort-fp32

With --checkpoint and --artifact it exports those instead (benchmarks/gpu_scale.py does, at LLaDA-8B's size),
loading the checkpoint in --dtype.
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
from faircalib.calib.runner import checkpoint_bytes, host_peak_mb
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


def export_one(checkpoint: Path, art: Path, profile: str, out: Path, consume: bool, dtype: torch.dtype) -> dict:
    """In this process: export, then report."""
    start = time.perf_counter()
    artifact = None if profile.endswith("fp32") else QuantArtifact.load(art)
    export(load_denoiser(checkpoint, dtype), artifact, profile, out, overwrite=True, consume=consume)
    weights = checkpoint_bytes(checkpoint)
    bundle = sum(f.stat().st_size for f in out.iterdir())
    peak = host_peak_mb()
    return {"profile": profile, "model": "consumed" if consume else "kept", "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - start, 1), "checkpoint_gb": weights / 1e9,
            "bundle_gb": bundle / 1e9, "host_peak_mb": round(peak),
            "peak_over_checkpoint_and_bundle": round(peak * 2**20 / (weights + bundle), 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=["ort-w4a16", "ort-fp32"])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--keep-model", action="store_true", help="also export leaving the loaded model as it is")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of a model built in --work")
    parser.add_argument("--artifact", type=Path, help="with --checkpoint: its artifact for the quantized profiles")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="to load the checkpoint in")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: export this profile and print its row
    args = parser.parse_args()
    checkpoint, artifact = args.checkpoint or args.work / "ckpt", args.artifact or args.work / "art"
    if args.one:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        row = export_one(checkpoint, artifact, args.one, args.work / args.one, not args.keep_model, dtype)
        print(json.dumps(row))
        return 0
    if args.checkpoint is None:
        torch.manual_seed(0)
        write_model(args.work, args.blocks, args.d_model, args.ffn)
    rows = []
    for profile in args.profiles:
        for keep in (False, True) if args.keep_model else (False,):
            paths = ["--checkpoint", str(checkpoint), "--artifact", str(artifact)]
            child = [sys.executable, __file__, "--work", str(args.work), "--one", profile, "--dtype", args.dtype,
                     *paths, *["--keep-model"] * keep]  # fmt: skip
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    (args.work / "export_memory.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
