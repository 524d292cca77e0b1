"""llama.cpp students of the bundled model, and what a llama.cpp user would compare them with.

- Parity: FAIR-Calib, GPTQ and RTN Q4_0 students (``--target gguf-q4_0``, the benchmark's calibration slices
  per seed) against llama.cpp's own Q4_0 and Q4_K_M (``llama-quantize`` of the F16 GGUF, built from the same
  pinned source), all run by llama.cpp on the same held-out prompts against the PyTorch teacher.
- Latency: one denoiser forward of the bundled model on this CPU for llama.cpp F16 / Q8_0 / Q4_0 beside ONNX
  Runtime fp32 / W8A8 and PyTorch fp32, one thread, the same tokens.

    python benchmarks/llamacpp.py --out runs/llamacpp [--seeds 0 1 2] [--methods fair gptq rtn] [--part all]

Writes ``parity.json``, ``latency.json`` and ``results.md`` to ``--out`` (rewritten as rows finish).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from faircalib.api import calibrate_to, export
from faircalib.bench.run import BenchConfig, evaluation, seed_data
from faircalib.calib.config import preset
from faircalib.calib.student import linear_widths
from faircalib.exporter.profiles import profile
from faircalib.models import load_denoiser, load_tokenizer
from faircalib.models.tokenizer import encode_prompt
from faircalib.runtime.backends import OrtBackend, TorchBackend
from faircalib.runtime.latency import step_latency
from faircalib.runtime.llamacpp import LlamaCppBackend
from faircalib.sampling.parity import parity_report
from faircalib.zoo import model_dir, wiki

METRICS = ("frontier_flip_rate", "frontier_write_error", "decision_margin_error", "commit_set_disagreement",
           "post_commit_mismatch_forced", "teacher_divergence")  # fmt: skip


def build_quantize_tool(work: Path) -> Path:
    """llama.cpp's llama-quantize, built from the source llama-cpp-python 0.3.36 vendors (once)."""
    binary = work / "build" / "bin" / "llama-quantize"
    if binary.is_file():
        return binary
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python==0.3.36"]
    subprocess.run([*pip, "-d", str(work)], check=True)
    subprocess.run(["tar", "xzf", str(next(work.glob("llama_cpp_python-*.tar.gz"))), "-C", str(work)], check=True)
    source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    flags = ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip
    subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-quantize", "-j2"], check=True)
    return binary


def llama_cpp_own(teacher, work: Path, tool: Path) -> dict[str, Path]:
    """llama.cpp's own Q4_0 and Q4_K_M of the teacher's F16 GGUF, each in a bundle of its own: as llama-quantize
    makes them (token embedding in the base type, output in Q6_K), and with both kept F16 as ours are."""
    f16 = work / "llama-f16"
    if not (f16 / "model.gguf").is_file():
        export(teacher, None, "gguf-f16", f16, overwrite=True)
    bundles = {"llama.cpp F16": f16}
    for kind in ("Q4_0", "Q4_K_M"):
        for suffix, flags in (("", []), (" (F16 embedding, head)", ["--token-embedding-type", "f16",
                                                                   "--output-tensor-type", "f16"])):  # fmt: skip
            bundle = work / f"llama-{kind.lower()}{'-f16-ends' if flags else ''}"
            bundle.mkdir(parents=True, exist_ok=True)
            if not (bundle / "model.gguf").is_file():
                subprocess.run([str(tool), *flags, str(f16 / "model.gguf"), str(bundle / "model.gguf"), kind],
                               check=True, capture_output=True)  # fmt: skip
            bundles[f"llama-quantize {kind}{suffix}"] = bundle
    return bundles


def our_students(teacher, cfg: BenchConfig, methods, seeds, work: Path) -> dict[str, Path]:
    """``--target gguf-q4_0`` students of each method and seed, calibrated on the benchmark's slices."""
    tokenizer = load_tokenizer(model_dir())
    texts = [t for _, t in wiki.load_articles("calib") if len(encode_prompt(tokenizer, t)) >= cfg.prompt_tokens]
    fields = profile("gguf-q4_0").calibration_fields(linear_widths(teacher))
    bundles = {}
    for seed in seeds:
        data = seed_data(cfg, seed, texts, text=False)
        for method in methods:
            qcfg = preset(method, seed=seed, n_prompts=cfg.n_calib_prompts, **fields)
            art = work / f"{method}-seed{seed}"
            if (work / f"bundle-{art.name}" / "model.gguf").is_file():  # made by an earlier run
                bundles[f"{method} Q4_0 seed {seed}"] = work / f"bundle-{art.name}"
                continue
            artifact = calibrate_to(art, copy.deepcopy(teacher), qcfg, data.prompts, cfg.sampling(), overwrite=True,
                                    data_description=data.description)  # fmt: skip
            bundles[f"{method} Q4_0 seed {seed}"] = export(teacher, artifact, "gguf-q4_0", work / f"bundle-{art.name}",
                                                           overwrite=True)  # fmt: skip
    return bundles


def parity_rows(cfg: BenchConfig, bundles: dict[str, Path], out: Path) -> list[dict]:
    """Parity of every bundle in llama.cpp against the teacher; rows an earlier run measured are kept."""
    ev = evaluation(cfg)
    rows = json.loads((out / "parity.json").read_text())["rows"] if (out / "parity.json").is_file() else []
    for name, bundle in bundles.items():
        if any(row["student"] == name for row in rows):
            continue
        report = parity_report(
            ev.teacher, LlamaCppBackend(bundle, threads=1), ev.prompts, cfg.sampling(), ev.teacher.spec,
            references=ev.references, teacher_post_commit=ev.post_commit, post_commit_probes=cfg.post_commit_probes,
        )  # fmt: skip
        size = (bundle / "model.gguf").stat().st_size
        rows.append({"student": name, "gguf_bytes": size, **{k: report[k] for k in METRICS}})
        print(f"{name}: flips {report['frontier_flip_rate']:.4f}  {size / 2**20:.1f} MiB", flush=True)
        (out / "parity.json").write_text(json.dumps({"teacher_post_commit": ev.post_commit, "rows": rows}, indent=1))
    return rows


def latency_rows(teacher, work: Path, out: Path, repeats: int) -> list[dict]:
    """One denoiser forward of [1, 48] tokens, one thread, on each runtime."""
    torch.set_num_threads(1)
    data_fields = dict(n_prompts=16, states_per_prompt=8)
    sampling = BenchConfig().sampling()
    prompts = wiki.prompt_ids(load_tokenizer(model_dir()), "calib", 16, 16)
    q8_fields = profile("gguf-q8_0").calibration_fields(linear_widths(teacher))
    q8 = calibrate_to(work / "gptq-q8", copy.deepcopy(teacher), preset("gptq", **data_fields, **q8_fields), prompts,
                      sampling, overwrite=True)  # fmt: skip
    w8a8_cfg = preset("gptq", wbits=8, abits=8, a_static=True, **data_fields)
    w8a8 = calibrate_to(work / "gptq-w8a8", copy.deepcopy(teacher), w8a8_cfg, prompts, sampling, overwrite=True)
    backends = {
        "pytorch fp32": TorchBackend(teacher),
        "onnxruntime fp32": OrtBackend(export(teacher, None, "ort-fp32", work / "ort-fp32", overwrite=True), threads=1),
        "onnxruntime W8A8": OrtBackend(export(teacher, w8a8, "ort-w8a8", work / "ort-w8a8", overwrite=True), threads=1),
        "llama.cpp F16": LlamaCppBackend(work / "llama-f16", threads=1),
        "llama.cpp Q8_0": LlamaCppBackend(
            export(teacher, q8, "gguf-q8_0", work / "gguf-q8", overwrite=True), threads=1
        ),
        "llama.cpp Q4_0": LlamaCppBackend(work / "bundle-fair-seed0", threads=1),
    }
    rows = []
    for name, backend in backends.items():
        rows.append({"backend": name, **step_latency(backend, 1, 48, teacher.spec.vocab_size, repeats=repeats)})
        print(f"{name}: {rows[-1]['median_ms']:.2f} ms", flush=True)
    (out / "latency.json").write_text(json.dumps({"rows": rows}, indent=1))
    return rows


def markdown(parity: list[dict], latency: list[dict]) -> str:
    lines = ["| student | GGUF (MiB) | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for row in parity:
        cells = " | ".join(f"{row[k]:.4f}" for k in METRICS)
        lines.append(f"| {row['student']} | {row['gguf_bytes'] / 2**20:.2f} | {cells} |")
    lines += ["", "| backend | median ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |" for r in latency]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["fair", "gptq", "rtn"])
    parser.add_argument("--n-eval", type=int, default=64, help="held-out prompts (default: 64, as the benchmark)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per backend (default: 30)")
    parser.add_argument("--part", choices=("all", "parity", "latency"), default="all", help="what to measure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    cfg = BenchConfig(n_eval_prompts=args.n_eval, out=str(work))
    work.mkdir(parents=True, exist_ok=True)
    teacher = load_denoiser(model_dir())
    bundles = llama_cpp_own(teacher, work, build_quantize_tool(work / "llama.cpp"))
    bundles.update(our_students(teacher, cfg, args.methods, args.seeds, work))
    if args.part in ("all", "parity"):
        parity_rows(cfg, bundles, args.out)
    if args.part in ("all", "latency"):
        latency_rows(teacher, work, args.out, args.repeats)
    read = lambda name, key: json.loads(p.read_text())[key] if (p := args.out / name).is_file() else []  # noqa: E731
    (args.out / "results.md").write_text(markdown(read("parity.json", "rows"), read("latency.json", "rows")))


if __name__ == "__main__":
    main()
