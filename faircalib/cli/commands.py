"""What each verb does: flags in, one library call, what it printed or wrote out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from faircalib.errors import ConfigError


def say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def pick_device(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """``--device`` / ``--dtype``, with "auto" resolved (CUDA and bf16 when there is a GPU) and said."""
    from faircalib.models import parse_dtype

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    name = args.dtype if args.dtype != "auto" else "bf16" if device.startswith("cuda") else "fp32"
    if "auto" in (args.device, args.dtype):
        say(args, f"device {device}, dtype {name}")
    return device, parse_dtype(name)


def join_torchrun(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1): join its process group, NCCL with one GPU per process or gloo on CPUs,
    so the work is shared (``faircalib.sampling.shard``); returns this process's rank (0 without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0
    import torch.distributed as dist

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def model_path(args: argparse.Namespace) -> Path:
    from faircalib.zoo import model_dir

    return args.model if args.model is not None else model_dir()


def load_model(args: argparse.Namespace):
    from faircalib.models import load_denoiser, load_tokenizer

    path = model_path(args)
    device, dtype = pick_device(args)
    model = load_denoiser(path, dtype, device, stream_blocks=args.stream_blocks)
    return model, load_tokenizer(path)


_LLADA_ONLY = ("block_length", "remasking", "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf")
_DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")


def sampling_from_args(args: argparse.Namespace, spec, base=None):
    """The family's sampling config (``base``, else a task model's own schedule, else the reference defaults)
    updated by the flags that were given; flags of the other family's sampler are rejected."""
    from faircalib.data import task_of
    from faircalib.sampling import default_sampling

    task = task_of(model_path(args)) if base is None and hasattr(args, "model") else None
    if task is not None:
        base = default_sampling(spec, **task["sampling"])

    foreign = _LLADA_ONLY if spec.sampler == "dream" else _DREAM_ONLY
    given_foreign = [f"--{name.replace('_', '-')}" for name in foreign if getattr(args, name) is not None]
    if spec.sampler == "dream" and args.block_length is not None and args.block_length == args.gen_length:
        given_foreign.remove("--block-length")  # one block over everything is what Dream does anyway
    if given_foreign:
        raise ConfigError(
            f"not options of the {spec.sampler} sampler that {spec.family} uses: {', '.join(given_foreign)}"
        )
    own = ("gen_length", "steps", "temperature") + (_DREAM_ONLY if spec.sampler == "dream" else _LLADA_ONLY)
    overrides = {name: getattr(args, name) for name in own if getattr(args, name) is not None}
    if spec.sampler != "dream" and "gen_length" in overrides and "block_length" not in overrides:
        overrides["block_length"] = overrides["gen_length"]
    if "gen_length" in overrides and "steps" not in overrides:
        overrides["steps"] = overrides["gen_length"]
    if base is not None:
        return dataclasses.replace(base, **overrides)
    return default_sampling(spec, **overrides)


def prompt_from_args(args: argparse.Namespace, tokenizer) -> list[int]:
    from faircalib.models.tokenizer import encode_prompt

    if args.prompt_ids is not None:
        try:
            return [int(tok) for tok in args.prompt_ids.split(",") if tok.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids}") from None
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: pass --prompt-ids instead of --prompt")
    return encode_prompt(tokenizer, args.prompt)


def student_backend(kind: str, bundle: Path | None, threads: int = 0):
    """The exported student of a bundle on ONNX Runtime, TensorRT or llama.cpp."""
    if bundle is None:
        raise ConfigError(f"--backend {kind} needs --bundle DIR (an export, or an engine directory for trt)")
    if kind == "trt":
        from faircalib.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle)
    if kind == "llamacpp":
        from faircalib.runtime.llamacpp import LlamaCppBackend

        return LlamaCppBackend(bundle, threads=threads)
    from faircalib.runtime.backends import OrtBackend

    return OrtBackend(bundle, threads=threads)


LOCAL_BACKENDS = ("torch", "triton")  # run --model itself (or an --artifact's student of it), not a bundle


def load_artifact(args: argparse.Namespace):
    """``--artifact``, checked against ``--model``; None when not given."""
    from faircalib.calib.artifact import QuantArtifact

    if args.artifact is None:
        return None
    artifact = QuantArtifact.load(args.artifact)
    artifact.check_model(model_path(args))
    return artifact


def local_student(kind: str, model, artifact):
    """``artifact``'s student on PyTorch (the fake-quant model) or on the Triton kernels; ``model`` becomes it."""
    from faircalib.runtime.triton_backend import TritonBackend

    if artifact is None:
        raise ConfigError(f"--backend {kind} runs a calibrated student here: give its --artifact")
    return TritonBackend(model, artifact) if kind == "triton" else artifact.apply(model)


def cmd_generate(args: argparse.Namespace) -> int:
    from faircalib.exporter.schedule_file import exported_schedule, read_schedule
    from faircalib.models import load_tokenizer
    from faircalib.progress import progress
    from faircalib.runtime.backends import TorchBackend
    from faircalib.runtime.driver import run_schedule

    if args.backend in LOCAL_BACKENDS:
        model, tokenizer = load_model(args)
        artifact = load_artifact(args)
        teacher = args.backend == "torch" and artifact is None
        student = model if teacher else local_student(args.backend, model, artifact)
        backend = student if isinstance(student, TorchBackend) else TorchBackend(student)
        base = artifact.sampling() if artifact is not None else None
        source = model_path(args)
        schedule = exported_schedule(model.spec, sampling_from_args(args, model.spec, base))
    elif args.artifact is not None:
        raise ConfigError(f"--artifact runs on --backend torch or triton; --backend {args.backend} runs its --bundle")
    else:
        backend = student_backend(args.backend, args.onnx, args.threads)
        source, tokenizer = args.onnx, load_tokenizer(args.onnx)
        exported = read_schedule(args.onnx)  # the graph is one forward: any plan runs on it
        schedule = exported_schedule(exported.spec, sampling_from_args(args, exported.spec, exported.sampling))
    prompt_ids = prompt_from_args(args, tokenizer)
    with progress(len(schedule.table), "denoising", "step", args.quiet) as bar:
        result = run_schedule(backend, schedule, torch.tensor(prompt_ids), seed=args.seed, on_step=bar.update)
    generated = result.generated[0].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        print(json.dumps({
            "model": str(source), "backend": args.backend, "family": schedule.spec.family,
            "sampling": schedule.sampling.to_json_dict(), "seed": args.seed, "prompt_ids": prompt_ids,
            "generated_ids": generated, "text": text,
        }))  # fmt: skip
    elif tokenizer is not None:
        print(tokenizer.decode(prompt_ids + generated, skip_special_tokens=True))
    else:
        print(" ".join(map(str, generated)))
    return 0


def quant_config_from_args(args: argparse.Namespace, model):
    """The calibration config: ``--method``'s preset for ``--target``'s format (for ``model``'s widths), then
    every flag given; a flag the target cannot express is an error."""
    from faircalib.calib.config import QuantConfig, preset
    from faircalib.calib.student import linear_widths
    from faircalib.exporter.profiles import profile

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig) if f.name != "method"}
    if args.target is None:
        return preset(args.method, **fields)
    target = profile(args.target)
    needs = target.calibration_fields(linear_widths(model))
    contradicting = [f"--{k.replace('_', '-')} {fields[k]}" for k, v in needs.items() if fields[k] not in (None, v)]
    cfg = preset(args.method, **{**needs, **{k: v for k, v in fields.items() if v is not None}})
    target.check_config(cfg, contradicting)
    return cfg


def cmd_calibrate(args: argparse.Namespace) -> int:
    from faircalib.api import calibrate_to
    from faircalib.calib.runner import stage_one
    from faircalib.data import calibration_data, self_written_data, task_of
    from faircalib.exporter.profiles import exportable_as

    rank = join_torchrun(args)
    model, tokenizer = load_model(args)
    cfg = quant_config_from_args(args, model)
    sampling = sampling_from_args(args, model.spec)
    if args.calib_source == "self":
        if args.calib_prompts is not None:
            raise ConfigError("--calib-source self writes its own prompts: drop --calib-prompts")
        data = self_written_data(model, cfg.n_prompts, args.prompt_tokens, sampling.gen_length, cfg.seed)
    else:
        data = calibration_data(tokenizer, cfg.n_prompts, args.prompt_tokens, sampling.gen_length, args.calib_prompts,
                                text=cfg.states == "text", task=task_of(model_path(args)))  # fmt: skip
    if rank > 0:  # decodes its share of Stage I's batches; the first process alone runs Stage II and writes --out
        stage_one(model, cfg, sampling, data.prompts, data.text_windows, None, quiet=True)
        return 0
    partial = args.out.with_name(args.out.name + ".partial")
    args.interrupted = f"what was finished is kept in {partial}: run the same command again to resume"
    artifact = calibrate_to(args.out, model, cfg, data.prompts, sampling, text_windows=data.text_windows,
                            data_description=data.description, overwrite=args.overwrite, quiet=args.quiet)  # fmt: skip
    timings = artifact.manifest["timings"]
    profiles = ", ".join(exportable_as(cfg)) or "none of the export profiles"
    print(
        f"wrote {args.out} ({cfg.method}, {cfg.format}); stage I {timings.get('stage1_seconds', 0):.1f}s, "
        f"stage II {timings['stage2_seconds']:.1f}s; exports as {profiles}",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from faircalib.api import export
    from faircalib.calib.artifact import QuantArtifact
    from faircalib.models import load_denoiser

    artifact = QuantArtifact.load(args.artifact) if args.artifact is not None else None
    model = load_denoiser(model_path(args))
    sampling = None
    if any(getattr(args, name) is not None for name in ("gen_length", "block_length", "steps", "temperature")):
        sampling = sampling_from_args(args, model.spec, artifact.sampling() if artifact is not None else None)
    gated = gated_parity(args.parity_report, args.artifact) if args.parity_report is not None else None
    kwargs = {"sampling": sampling, "overwrite": args.overwrite, "parity": gated, "consume": True}  # loaded for it
    print(f"wrote {export(model, artifact, args.profile, args.out, **kwargs)} ({args.profile})", file=sys.stderr)
    return 0


def gated_parity(path: Path, artifact: Path | None) -> dict:
    """The summary of a ``parity --json`` report (its rates and gate, not its curves) for a bundle's manifest."""
    from faircalib.models.checkpoint import read_json_object

    if not path.is_file():
        raise ConfigError(f"parity report not found: {path}")
    report = read_json_object(path)
    measured = report.get("artifact")
    if artifact is not None and measured is not None and Path(measured).resolve() != artifact.resolve():
        raise ConfigError(f"{path} measured the artifact {measured}, not {artifact}")
    return {k: v for k, v in report.items() if k not in ("curves", "vs_fake_quant") and not isinstance(v, list)}


def cmd_check_onnx(args: argparse.Namespace) -> int:
    from faircalib.exporter.trt_rules import check_tensorrt

    if not args.onnx.is_file():
        raise ConfigError(f"ONNX file not found: {args.onnx}")
    violations = check_tensorrt(args.onnx)
    for violation in violations:
        print(violation)
    print(f"{args.onnx}: {len(violations)} TensorRT rule violation(s)", file=sys.stderr)
    return 1 if violations else 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from faircalib.runtime.tensorrt import EngineConfig, build_engine

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    cfg = EngineConfig(**{k: v for k, v in fields.items() if v is not None})
    out = build_engine(args.onnx, args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {out}/model.engine", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from faircalib.bench import BenchConfig, run_bench

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if v is not None})
    run_bench(cfg)
    print(f"wrote {cfg.out}/results.json, results.md and report.html", file=sys.stderr)
    return 0
