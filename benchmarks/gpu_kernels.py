"""Speed of the Triton kernels on one GPU: the integer GEMM and the W4A16 dequantize-GEMM against torch's bf16
matmul and ``torch._int_mm`` at LLaDA-8B's linear shapes, then one denoising step of the 8B-shaped model
(random weights) in bf16 and as W8A8 / W4A8 / W4A4 / W4A16 students on the kernels, with peak memory and a
profile of where each step's time goes.

    python benchmarks/gpu_kernels.py --out runs/gpu-kernels          # on a CUDA machine, one call
    python benchmarks/gpu_kernels.py --out /tmp/smoke --smoke        # tiny shapes, any machine: checks the script

Writes ``gemm.json`` and ``step.json`` to ``--out`` (each rewritten as rows finish, so a cut-off run keeps them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, replace_linear
from faircalib.calib.quant import ActSpec, WeightSpec, quantize_weight, weight_qparams
from faircalib.calib.student import linear_names
from faircalib.kernels import ops, reference
from faircalib.kernels.hadamard import hadamard_block
from faircalib.kernels.int4 import pack_int4
from faircalib.models import LLaDA, LLaDAConfig
from faircalib.models.tiny import randomize_
from faircalib.runtime.backends import TorchBackend
from faircalib.runtime.latency import decision_step
from faircalib.runtime.triton_backend import KernelLinear

sys.path.insert(0, str(Path(__file__).parent))
from gpu_scale import LLADA_8B  # noqa: E402

SMOKE_MODEL = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=512,
                   embedding_size=512, mask_token_id=500, eos_token_id=501, eot_token_id=None)  # fmt: skip
# name -> (weight bits, weight group, activation bits, online Hadamard before the down projection)
STUDENTS = {"W8A8": (8, None, 8, False), "W4A8": (4, None, 8, False), "W4A4": (4, None, 4, True),
            "W4A16": (4, 128, 16, False)}  # fmt: skip


def median_ms(fn, *args, repeats: int = 30) -> float:
    """Median milliseconds of ``fn(*args)`` after warm-up: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def gemm_rows(shapes, ms, small_ms, device, out: Path, repeats: int) -> list[dict]:
    """Per (N, K, M): bf16 matmul, torch._int_mm, our int8 GEMM with int8 and packed int4 weights (epilogue
    included), activation quantization alone; W4A16 at small M. Throughput in TFLOP/s (2 M N K / time)."""
    rows = []
    for n, k in shapes:
        w8 = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        w4 = pack_int4(torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8))
        w_scale = torch.rand(n, 1, device=device) / 100
        w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            a, a_scale = ops.quantize_rows(x, 8)
            units = torch.ones_like(a_scale), torch.ones_like(w_scale)
            exact = torch.equal(ops.int_gemm(a, units[0], w8, units[1]), reference.int_gemm(a, units[0], w8, units[1]))
            row = {"n": n, "k": k, "m": m, "int_gemm_exact": exact}
            row["bf16_ms"] = median_ms(torch.matmul, x, w_bf16.T, repeats=repeats)
            if hasattr(torch, "_int_mm") and x.is_cuda and m > 16:
                row["torch_int_mm_ms"] = median_ms(torch._int_mm, a, w8.T, repeats=repeats)
            bf16 = torch.bfloat16
            row["w8a8_gemm_ms"] = median_ms(ops.int_gemm, a, a_scale, w8, w_scale, None, bf16, repeats=repeats)
            row["w4a8_gemm_ms"] = median_ms(ops.int_gemm, a, a_scale, w4, w_scale, None, bf16, True, repeats=repeats)
            row["quantize_ms"] = median_ms(ops.quantize_rows, x, 8, repeats=repeats)
            flops = 2 * m * n * k / 1e9
            for key in [key for key in row if key.endswith("_ms")]:
                row[key.replace("_ms", "_tflops")] = round(flops / row[key], 1)
            row["w8a8_speedup_vs_bf16"] = round(row["bf16_ms"] / (row["w8a8_gemm_ms"] + row["quantize_ms"]), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1))
        scale_g, zero_g = torch.rand(n, k // 128, device=device) / 100, None
        for m in small_ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            row = {"n": n, "k": k, "m": m, "bf16_ms": median_ms(torch.matmul, x, w_bf16.T, repeats=repeats)}
            row["w4a16_ms"] = median_ms(ops.dequant_gemm, x, w4, scale_g, zero_g, repeats=repeats)
            row["w4a16_speedup_vs_bf16"] = round(row["bf16_ms"] / row["w4a16_ms"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1))
    return rows


@torch.no_grad()
def to_student(model: LLaDA, wbits: int, group: int | None, abits: int, hadamard: bool) -> None:
    """Every linear of every block replaced, in place, by a KernelLinear of its round-to-nearest codes."""
    spec, act = WeightSpec(wbits, group), ActSpec(abits)
    layout = model.rotation_layout()
    for block in model.blocks:
        for name in linear_names(model):
            linear = block.get_submodule(name)
            w = linear.weight.float()
            scale, zero = weight_qparams(w, spec)
            layer = QuantizedLayer(QuantizedWeight(quantize_weight(w, scale, zero, spec), scale, zero, spec), act)
            replace_linear(block, name, KernelLinear(layer, linear.bias).to(w.device))
            del w, linear
        if hadamard:  # the fused online rotation's cost (random weights: nothing to rotate for)
            down = block.get_submodule(layout.ffn_down)
            down.hadamard_block = hadamard_block(down.in_features)


def profile_step(backend, ids, block_length: int, top: int = 8) -> list[dict]:
    """The kernels taking most of one step's device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        decision_step(backend, ids, block_length)
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return [{"name": e.key[:80], "ms": round(getattr(e, key, 0) / 1000, 3), "calls": e.count} for e in events]


def step_rows(config: dict, batches, seq: int, block_length: int, device, out: Path, repeats: int) -> list[dict]:
    """One denoising step (forward and decision) of the model in bf16 and as each student."""
    rows = []
    for name in ("bf16", *STUDENTS):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with torch.device(device):
            model = LLaDA(LLaDAConfig(**config))
        randomize_(model, 0)
        model.to(torch.bfloat16).eval()
        if name != "bf16":
            to_student(model, *STUDENTS[name])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        backend = TorchBackend(model)
        for batch in batches:
            ids = torch.randint(0, model.spec.mask_token_id - 8, (batch, seq), device=device)  # ordinary tokens
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            row = {"model": name, "batch": batch, "seq": seq, "block_length": block_length,
                   "step_ms": median_ms(decision_step, backend, ids, block_length, repeats=repeats),
                   "resident_mb": resident}  # fmt: skip
            if torch.cuda.is_available():
                row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row["profile"] = profile_step(backend, ids, block_length)
            baseline = next((r["step_ms"] for r in rows if r["model"] == "bf16" and r["batch"] == batch), None)
            row["speedup_vs_bf16"] = round(baseline / row["step_ms"], 2) if baseline else 1.0
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            out.write_text(json.dumps(rows, indent=1))
        del model, backend
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and model, on whatever device there is")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("gpu_kernels needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    (args.out / "machine.json").write_text(json.dumps(machine, indent=1))
    print(json.dumps(machine), flush=True)
    if args.smoke:
        shapes, ms, small_ms, config, batches, seq = [(96, 256)], [3, 40], [1], SMOKE_MODEL, (1, 2), 24
    else:
        shapes = [(4096, 4096), (12288, 4096), (4096, 12288)]
        ms, small_ms, config, batches, seq = [144, 1024, 4608, 16384], [1, 16, 64], LLADA_8B, (1, 16), 144
    if not args.skip_gemm:
        gemm_rows(shapes, ms, small_ms, device, args.out / "gemm.json", args.repeats)
    if not args.skip_step:
        step_rows(config, batches, seq, 32 if not args.smoke else 8, device, args.out / "step.json", args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
