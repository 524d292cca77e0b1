"""The measuring verbs: parity of a student against its teacher, and per-step latency."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys

from faircalib.cli.commands import (
    LOCAL_BACKENDS,
    join_torchrun,
    load_artifact,
    load_model,
    local_student,
    model_path,
    pick_device,
    sampling_from_args,
    student_backend,
)
from faircalib.errors import ConfigError
from faircalib.files import write_json_atomic

LATENCY_PROMPT_TOKENS = 16  # a latency row's prompt: LLaDA's reference 128-token answer then runs over 144

# metric -> (the teacher's own level, which way is better): what the table prints beside each figure
DIRECTIONS = {
    "task_accuracy": ("task", "higher"),
    "frontier_flip_rate": ("0", "lower"),
    "commit_set_disagreement": ("0", "lower"),
    "frontier_write_error": ("0", "lower"),
    "decision_margin_error": ("0", "lower"),
    "post_commit_mismatch": ("teacher", "nearer the teacher"),
    "post_commit_mismatch_forced": ("teacher", "nearer the teacher"),
    "post_commit_forced_distance": ("0", "lower"),
    "teacher_divergence": ("0", "lower"),
    "exact_match": ("1", "higher"),
    "masked_nll": ("nll", "lower"),
}


def parity_table(report: dict) -> str:
    """The report as rows of metric, student, teacher's own level, and which way is better."""
    rows = [f"{'metric':30s} {'student':>9s} {'teacher':>9s}  better"]
    for name, (level, better) in DIRECTIONS.items():
        value = report.get("masked_nll_q" if name == "masked_nll" else name)
        if value is None:
            continue
        levels = {"teacher": report.get("post_commit_mismatch_teacher"), "nll": report.get("masked_nll_fp"),
                  "task": report.get("task_accuracy_teacher")}  # fmt: skip
        teacher = levels.get(level, level)
        teacher = f"{teacher:.4f}" if isinstance(teacher, float) else teacher
        shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        rows.append(f"{name:30s} {shown:>9s} {teacher:>9s}  {better}")
    if "vs_fake_quant" in report:
        agreement = report["vs_fake_quant"]["decision_agreement"]
        rows.append(
            f"{'agreement_vs_fake_quant':30s} {agreement:>9.4f} {'-':>9s}  higher (exported vs PyTorch student)"
        )
    return "\n".join(rows)


def student_of(args: argparse.Namespace, teacher):
    """The student to measure, its artifact (if any) and the schedule it was made for."""
    from faircalib.calib.artifact import model_fingerprint
    from faircalib.exporter.schedule_file import read_schedule
    from faircalib.runtime.backends import bundle_manifest

    artifact = load_artifact(args)
    if args.backend in LOCAL_BACKENDS:
        return local_student(args.backend, copy.deepcopy(teacher), artifact), artifact, artifact.sampling()
    student = student_backend(args.backend, args.onnx, args.threads)
    made_for = (bundle_manifest(args.onnx).get("model") or {}).get("fingerprint")
    if made_for is not None and made_for != model_fingerprint(model_path(args)):
        raise ConfigError(f"{args.onnx} was exported from another checkpoint than {model_path(args)}")
    return student, artifact, read_schedule(args.onnx).sampling


def cmd_parity(args: argparse.Namespace) -> int:
    from faircalib.data import evaluation_data, task_of
    from faircalib.progress import progress
    from faircalib.sampling import record_runs
    from faircalib.sampling.parity import check_gate, decision_agreement, parity_report

    if args.gate is not None:
        check_gate({}, args.gate)  # a malformed gate fails before any work
    rank = join_torchrun(args)  # every process measures its share of the prompts; the first one reports
    args.quiet = args.quiet or rank > 0

    teacher, tokenizer = load_model(args)
    student, artifact, base = student_of(args, teacher)
    sampling = sampling_from_args(args, teacher.spec, base)
    task = task_of(model_path(args))
    data = evaluation_data(tokenizer, args.n_prompts, args.prompt_tokens, sampling.gen_length, args.prompts, task)
    spec, device, n = teacher.spec, teacher.device, len(data.prompts)
    with progress(n, "parity: teacher", "prompt", args.quiet, fractional=True) as bar:
        references = record_runs(teacher, data.prompts, sampling, spec, batch_size=args.batch_size, device=device,
                                 on_progress=bar.update)  # fmt: skip
    with progress(n, "parity: student", "prompt", args.quiet, fractional=True) as bar:
        report = parity_report(
            teacher, student, data.prompts, sampling, spec, references=references, nll_windows=data.text_windows,
            post_commit_probes=args.post_commit_probes, device=device, on_progress=bar.update, judge=data.judge,
        )  # fmt: skip
    if rank > 0:
        return 0
    report["backend"] = args.backend
    if artifact is not None:
        report.update(method=artifact.config.method, format=artifact.config.format, artifact=str(args.artifact))
        if "promotion" in artifact.manifest:
            report["promotion"] = artifact.manifest["promotion"]
        if args.backend != "torch":  # the exported or kernel-backed student against the PyTorch one
            fake_quant = artifact.apply(copy.deepcopy(teacher))
            report["vs_fake_quant"] = decision_agreement(student, fake_quant, references, sampling, spec)
    failures = check_gate(report, args.gate) if args.gate is not None else []
    if args.gate is not None:
        report["gate"] = {"rules": args.gate, "passed": not failures, "failures": failures}
    print(json.dumps(report) if args.json else parity_table(report))
    if args.report is not None:
        from faircalib.bench.page import parity_page

        page = parity_page(report, args.report, getattr(sampling, "block_length", sampling.gen_length))
        print(f"wrote {page}", file=sys.stderr)
    for line in failures:
        print(f"faircalib: gate failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_latency(args: argparse.Namespace) -> int:
    import torch

    from faircalib.models import DTYPES, load_denoiser
    from faircalib.runtime.backends import OrtBackend, TorchBackend, bundle_manifest
    from faircalib.runtime.latency import step_latency
    from faircalib.runtime.triton_backend import TritonBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args)
    path = model_path(args)
    model = load_denoiser(path, dtype, device, stream_blocks=args.stream_blocks)
    artifact = load_artifact(args)
    sampling = sampling_from_args(args, model.spec, artifact.sampling() if artifact is not None else None)
    block = getattr(sampling, "block_length", sampling.gen_length)  # Dream decides over the whole generation
    seq = args.seq if args.seq is not None else LATENCY_PROMPT_TOKENS + sampling.gen_length
    name = next(key for key, value in DTYPES.items() if value == dtype)
    backends = [(f"torch-{name}", lambda: TorchBackend(model))]
    if artifact is not None:
        fmt = artifact.config.format
        backends.append((f"torch-{fmt}", lambda: TorchBackend(artifact.apply(copy.deepcopy(model)))))
        # packed on the host, then moved: the device never holds this copy's full-precision weights
        backends.append((f"triton-{fmt}", lambda: TritonBackend(load_denoiser(path, dtype, "cpu"), artifact, device)))
    for bundle in args.onnx or []:
        backends.append((bundle_manifest(bundle)["profile"], lambda b=bundle: OrtBackend(b, threads=args.threads)))
    rows = []
    for label, build in backends:
        row = {"backend": label, **step_latency(build(), args.batch, seq, block, model.spec.vocab_size,
                                                repeats=args.repeats)}  # fmt: skip
        rows.append(row)
        memory = f", device peak {row['device_peak_mb']:.0f} MiB" if "device_peak_mb" in row else ""
        print(f"{label:14s} batch {args.batch} seq {seq}: {row['median_ms']:.2f} ms (p90 {row['p90_ms']:.2f}), "
              f"host peak {row['host_peak_mb']:.0f} MiB{memory}")  # fmt: skip
    if args.out is not None:
        report = {"model": str(path), "device": device, "threads": args.threads, "sampling": sampling.to_json_dict(),
                  "rows": rows}  # fmt: skip
        write_json_atomic(args.out, report)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on the teacher (``--backend torch`` alone), the fake-quant student of an
    ``--artifact``, or an exported bundle on its runtime."""
    import importlib.util

    from faircalib.data import task_of

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'faircalib[eval]' (lm-eval==0.4.13)")
    from faircalib import lmeval

    teacher, tokenizer = load_model(args)
    if tokenizer is None:
        raise ConfigError(f"{model_path(args)} has no tokenizer: lm-eval's tasks are text")
    if args.backend == "torch" and args.artifact is None:
        denoise, artifact, base, name = teacher, None, None, "teacher"
    else:
        denoise, artifact, base = student_of(args, teacher)
        name = f"{artifact.config.method} {artifact.config.format}" if artifact is not None else str(args.onnx)
    sampling = sampling_from_args(args, teacher.spec, base)
    lm = lmeval.DenoiserLM(denoise, teacher.spec, tokenizer, sampling, device=teacher.device, mc_num=args.mc_num,
                           batch_size=args.batch_size)  # fmt: skip
    specs = lmeval.task_specs(args.tasks, task_of(model_path(args)), args.limit)
    scores = lmeval.summary(lmeval.evaluate(lm, specs, include_path=args.include_path, limit=args.limit))
    for task, metrics in scores["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
        print(f"{task} ({name}): {shown} on {metrics['examples']} examples")
    if args.out is not None:
        write_json_atomic(args.out, {"model": str(model_path(args)), "backend": args.backend, "student": name,
                                     "sampling": sampling.to_json_dict(), **scores})  # fmt: skip
    return 0
