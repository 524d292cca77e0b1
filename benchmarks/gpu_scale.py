"""Calibration time and peak memory at LLaDA-8B scale on one GPU, plus the Hadamard transform's speed.

No 8B checkpoint can be downloaded where this runs, so the model is LLaDA-8B's exact architecture (32
blocks, d_model 4096, FFN 12288, 126464-token vocabulary) with random weights, written in the official
sharded layout and loaded back through the same loader a user's checkpoint goes through. Random weights make
the timings and memory real and the quality meaningless: decision metrics are not reported here.

    python benchmarks/gpu_scale.py --out runs/gpu-scale [--layers 32] [--methods fair gptq-recon] [--stream-blocks]

``--stream-blocks`` keeps the blocks in host memory (each on the GPU only while it runs), as on a 24 GB GPU.
``--export`` then calibrates an RTN W4A16 artifact (groups of 128) and exports it as ``ort-w4a16`` and
``trt-w4a16``, each in a fresh process on the host (benchmarks/export_memory.py): seconds and host peak against
checkpoint + bundle, into ``export.json``.

Writes ``scale.json`` (one record per method, rewritten after each so a cut-off run keeps what finished)
and ``hadamard.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from faircalib.api import calibrate_to
from faircalib.calib.config import preset
from faircalib.calib.runner import host_peak_mb
from faircalib.kernels.hadamard import apply_block_hadamard, hadamard_block, hadamard_matrix, hadamard_reference
from faircalib.models import LLaDA, LLaDAConfig, load_denoiser
from faircalib.models.tiny import randomize_
from faircalib.sampling import default_sampling

LLADA_8B = dict(
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    mlp_hidden_size=12288,
    vocab_size=126464,
    embedding_size=126464,
)


def write_random_llada(out: Path, layers: int, seed: int) -> float:
    """LLaDA-8B's layout with ``layers`` blocks and random bf16 weights, built on the GPU; seconds taken."""
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LLaDA(LLaDAConfig(**{**LLADA_8B, "n_layers": layers}))
    randomize_(model, seed)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_bytes=5 * 2**30)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def calibrate_one(model_dir: Path, method: str, args: argparse.Namespace, work: Path) -> dict:
    start = time.perf_counter()
    model = load_denoiser(model_dir, torch.bfloat16, "cuda", stream_blocks=args.stream_blocks)
    load_seconds = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    model_mb = torch.cuda.memory_allocated() / 2**20
    cfg = preset(method, wbits=4, abits=args.abits, n_prompts=args.n_prompts, seed=args.seed)
    sampling = default_sampling(
        model.spec, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps
    )
    generator = torch.Generator().manual_seed(args.seed)
    # token ids below the specials (LLaDA's mask is 126336): a random model has no tokenizer to encode text
    prompts = torch.randint(0, 126000, (cfg.n_prompts, args.prompt_tokens), generator=generator).tolist()
    out = work / f"{method}-w4a{args.abits}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    artifact = calibrate_to(out, model, cfg, prompts, sampling, overwrite=True)
    wall = time.perf_counter() - start
    manifest = artifact.manifest
    blocks = manifest["blocks"]
    record = {
        "method": method,
        "format": cfg.format,
        "stream_blocks": args.stream_blocks,
        "config": cfg.to_json_dict(),
        "sampling": sampling.to_json_dict(),
        "blocks": len(blocks),
        "load_seconds": round(load_seconds, 1),
        "wall_seconds": round(wall, 1),
        "timings": {k: round(v, 1) for k, v in manifest["timings"].items()},
        "block_seconds_mean": round(sum(b["seconds"] for b in blocks) / len(blocks), 2),
        "gptq_retries": sum(b["gptq_retries"] for b in blocks),
        "model_gpu_mb": round(model_mb),
        "peak_gpu_mb": round(manifest["peak_memory_mb"]),
        "peak_gpu_mb_by_stage": manifest["gpu_peak_mb_by_stage"],
        "host_peak_mb": round(host_peak_mb()),
        "artifact_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20),
    }
    del model, artifact
    torch.cuda.empty_cache()
    return record


def time_cuda(fn, repeats: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after warm-up, by CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def hadamard_bench() -> list[dict]:
    """The online Hadamard of the FFN (12288 wide, blocks of 4096) and of a 4096-wide residual, in bf16: the
    butterfly the export uses against a product with the block matrix, materialised once."""
    rows = []
    for width in (4096, 12288):
        block = hadamard_block(width)
        h = (hadamard_matrix(block) / block**0.5).to("cuda", torch.bfloat16)
        for tokens in (48, 48 * 16, 256 * 16):
            x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
            error = (apply_block_hadamard(x.float(), block) - hadamard_reference(x.double(), block)).abs().max()
            butterfly = time_cuda(lambda x=x, block=block: apply_block_hadamard(x, block))
            matmul = time_cuda(lambda x=x, h=h: (x.view(x.shape[0], -1, h.shape[0]) @ h).view(x.shape))
            moved = 2 * x.numel() * x.element_size()  # one read and one write: what a fused kernel would move
            rows.append({
                "width": width, "block": block, "tokens": tokens, "butterfly_ms": round(butterfly, 4),
                "matmul_ms": round(matmul, 4), "butterfly_gb_per_s": round(moved / butterfly / 1e6, 1),
                "matmul_gb_per_s": round(moved / matmul / 1e6, 1), "max_abs_error_fp32": float(error),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def export_rows(model_dir: Path, args: argparse.Namespace) -> list[dict]:
    """RTN W4A16 g128 of the checkpoint (on the GPU), then its ort-w4a16 and trt-w4a16 exports on the host."""
    model = load_denoiser(model_dir, torch.bfloat16, "cuda")
    cfg = preset("rtn", wbits=4, abits=16, group_size=128, n_prompts=2)
    sampling = default_sampling(model.spec, gen_length=8, block_length=8, steps=8)
    artifact = args.work / "rtn-w4a16-g128"
    calibrate_to(artifact, model, cfg, [[5, 6, 7], [8, 9, 10]], sampling, overwrite=True)
    del model
    torch.cuda.empty_cache()
    script = Path(__file__).with_name("export_memory.py")
    command = [sys.executable, str(script), "--work", str(args.work / "bundles"), "--checkpoint", str(model_dir),
               "--artifact", str(artifact), "--dtype", "bf16", "--profiles", "ort-w4a16", "trt-w4a16"]  # fmt: skip
    (args.work / "bundles").mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)
    return json.loads((args.work / "bundles" / "export_memory.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/faircalib-scale"), help="checkpoint and artifacts")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["fair", "gptq-recon"])
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hadamard", action="store_true")
    parser.add_argument("--stream-blocks", action="store_true", help="blocks in host memory, one on the GPU at a time")
    parser.add_argument("--export", action="store_true", help="also export an RTN W4A16 artifact (ort / trt-w4a16)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_scale needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": torch.get_num_threads(),
    }
    if not args.skip_hadamard:
        rows = hadamard_bench()
        (args.out / "hadamard.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    model_dir = args.work / f"llada-8b-layout-{args.layers}l-seed{args.seed}"
    write_seconds = None
    if not (model_dir / "config.json").is_file():  # written last: its presence means a whole checkpoint
        shutil.rmtree(model_dir, ignore_errors=True)
        write_seconds = write_random_llada(model_dir, args.layers, args.seed)
        print(f"wrote {model_dir} in {write_seconds:.0f}s", flush=True)
    report = {"machine": machine, "layers": args.layers, "write_checkpoint_seconds": write_seconds}
    report["methods"] = []
    for method in args.methods:
        report["methods"].append(calibrate_one(model_dir, method, args, args.work))
        print(json.dumps(report["methods"][-1]), flush=True)
        (args.out / "scale.json").write_text(json.dumps(report, indent=1))
    if args.export:
        rows = export_rows(model_dir, args)
        (args.out / "export.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
