"""`faircalib <verb>`: a thin layer from flags to the library. Flags map one to one onto config fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from faircalib.errors import ConfigError, FaircalibError
from faircalib.models.tokenizer import encode_prompt


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from faircalib.zoo import DEFAULT_MODEL

    parser.add_argument(
        "--model", type=Path, default=None, help=f"checkpoint directory (default: the bundled {DEFAULT_MODEL})"
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults follow the family's reference implementation)")
    group.add_argument("--gen-length", type=int)
    group.add_argument("--block-length", type=int, help="LLaDA-style samplers only")
    group.add_argument("--steps", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--remasking", choices=("low_confidence", "random"), help="LLaDA-style samplers only")
    group.add_argument("--cfg-scale", type=float, help="classifier-free guidance (LLaDA-style samplers only)")
    group.add_argument("--logits-eos-inf", action="store_true", default=None, help="LLaDA: never sample EOS")
    group.add_argument(
        "--confidence-eos-eot-inf", action="store_true", default=None, help="LLaDA: never commit EOS/EoT early"
    )
    group.add_argument("--alg", choices=("origin", "maskgit_plus", "topk_margin", "entropy"), help="Dream only")
    group.add_argument("--alg-temp", type=float, help="Dream only")
    group.add_argument("--top-p", type=float, help="Dream only")
    group.add_argument("--top-k", type=int, help="Dream only")
    group.add_argument("--eps", type=float, help="Dream only: final timestep")


DEFAULT_PROMPT_TOKENS = 16

_LLADA_ONLY = ("block_length", "remasking", "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf")
_DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")


def sampling_from_args(args: argparse.Namespace, spec, base=None):
    """The family's sampling config (``base``, else the reference defaults) updated by the flags that were
    given; flags of the other family's sampler are rejected."""
    from faircalib.sampling import default_sampling

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


def _load_model(args: argparse.Namespace):
    from faircalib.models import load_denoiser, load_tokenizer, parse_dtype

    path = args.model if args.model is not None else _default_model()
    model = load_denoiser(path, parse_dtype(args.dtype), args.device)
    return path, model, load_tokenizer(path)


def prompt_from_args(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(tok) for tok in args.prompt_ids.split(",") if tok.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: pass --prompt-ids instead of --prompt")
    return encode_prompt(tokenizer, args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from faircalib.sampling import generate, plan

    if args.backend == "torch":
        source, model, tokenizer = _load_model(args)
        denoise, spec = model, model.spec
        sampling = sampling_from_args(args, spec)
    else:
        from faircalib.exporter.schedule_file import read_schedule
        from faircalib.models import load_tokenizer

        denoise = student_backend(args.backend, args.onnx)
        exported = read_schedule(args.onnx)
        source, spec, tokenizer = args.onnx, exported.spec, load_tokenizer(args.onnx)
        sampling = sampling_from_args(args, spec, exported.sampling)  # the graph is one forward: any plan runs
    prompt_ids = prompt_from_args(args, tokenizer)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    schedule = plan(sampling, len(prompt_ids))
    with tqdm(total=len(schedule.steps), desc="denoising", unit="step", disable=args.quiet, file=sys.stderr) as bar:

        def counted(tokens: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return denoise(tokens)

        result = generate(counted, prompt, sampling, spec, seed=args.seed, schedule=schedule)
    generated = result.generated[0].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        payload = {
            "model": str(source),
            "backend": args.backend,
            "family": spec.family,
            "sampling": sampling.to_json_dict(),
            "seed": args.seed,
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
        }
        print(json.dumps(payload))
    elif tokenizer is not None:
        print(tokenizer.decode(prompt_ids + generated, skip_special_tokens=True))
    else:
        print(" ".join(map(str, generated)))
    return 0


def add_dataclass_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per dataclass field (default None: the preset or class default applies)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        is_union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if is_union else kind
        if typing.get_origin(base) is tuple:
            parser.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=None)
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None)
        else:
            parser.add_argument(flag, type=base, default=None, metavar=base.__name__.upper())


def read_prompt_file(path: Path, tokenizer, limit: int | None, max_tokens: int | None = None) -> list[list[int]]:
    """One prompt per non-empty line (the first ``limit`` lines); lines may be whole documents, so
    ``max_tokens`` keeps only their openings."""
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: a prompts file needs one")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{path} holds no prompts")
    return [encode_prompt(tokenizer, line)[:max_tokens] for line in lines[:limit]]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from faircalib.calib.config import QuantConfig, preset
    from faircalib.calib.runner import run_calibration
    from faircalib.zoo import wiki

    path, model, tokenizer = _load_model(args)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig) if f.name != "method"}
    cfg = preset(args.method, **fields)
    sampling = sampling_from_args(args, model.spec)
    windows, source = None, {}
    prompt_tokens = args.prompt_tokens or DEFAULT_PROMPT_TOKENS
    if args.calib_prompts is not None:
        source = {"source": str(args.calib_prompts), "prompt_tokens": args.prompt_tokens}
        if cfg.states == "text":
            length = prompt_tokens + sampling.gen_length
            lines = read_prompt_file(args.calib_prompts, tokenizer, cfg.n_prompts)
            long_enough = [p[:length] for p in lines if len(p) >= length]
            if not long_enough:
                raise ConfigError(f"no line of {args.calib_prompts} has {length} tokens for text calibration")
            windows = torch.tensor(long_enough, dtype=torch.long)
        prompts = read_prompt_file(args.calib_prompts, tokenizer, cfg.n_prompts, args.prompt_tokens)
    else:
        if tokenizer is None:
            raise ConfigError("this model has no tokenizer: pass --calib-prompts with prompts it can read")
        prompts = wiki.prompt_ids(tokenizer, "calib", cfg.n_prompts, prompt_tokens)
        source = {"source": "wikipedia leads, calib split", "prompt_tokens": prompt_tokens}
        if cfg.states == "text":
            windows = wiki.text_windows(tokenizer, "calib", cfg.n_prompts, prompt_tokens + sampling.gen_length)
    artifact = run_calibration(
        path, cfg, sampling, prompts, args.out, text_windows=windows, data_description=source, quiet=args.quiet,
        model=model,
    )  # fmt: skip
    timings = artifact.manifest["timings"]
    print(
        f"wrote {args.out} ({cfg.method}, {cfg.format}); stage I {timings.get('stage1_seconds', 0):.1f}s, "
        f"stage II {timings['stage2_seconds']:.1f}s",
        file=sys.stderr,
    )
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from faircalib.calib.artifact import QuantArtifact, model_fingerprint
    from faircalib.calib.evaluate import fake_quant_student, parity_report
    from faircalib.sampling import sampling_from_json_dict
    from faircalib.sampling.metrics import PARITY_METRICS, decision_agreement, teacher_runs
    from faircalib.zoo import wiki

    path, teacher, tokenizer = _load_model(args)
    artifact = None
    if args.artifact is not None:
        artifact = QuantArtifact.load(args.artifact)
        artifact.check_model(path)
    if args.backend == "torch":
        if artifact is None:
            raise ConfigError("--backend torch compares the fake-quant student of an --artifact")
        recorded = artifact.manifest.get("sampling")
        base = sampling_from_json_dict(recorded) if recorded else None
        student = fake_quant_student(teacher, artifact)
    else:
        from faircalib.exporter.schedule_file import read_schedule
        from faircalib.runtime.backends import bundle_manifest

        student = student_backend(args.backend, args.onnx)
        made_for = (bundle_manifest(args.onnx).get("model") or {}).get("fingerprint")
        if made_for is not None and made_for != model_fingerprint(path):
            raise ConfigError(f"{args.onnx} was exported from another checkpoint than {path}")
        base = read_schedule(args.onnx).sampling
    sampling = sampling_from_args(args, teacher.spec, base)
    nll_windows = None
    if args.prompts is not None:
        prompts = read_prompt_file(args.prompts, tokenizer, args.n_prompts, args.prompt_tokens)
    elif tokenizer is not None:
        prompt_tokens = args.prompt_tokens or DEFAULT_PROMPT_TOKENS
        prompts = wiki.prompt_ids(tokenizer, "eval", args.n_prompts, prompt_tokens)
        nll_windows = wiki.text_windows(tokenizer, "eval", args.n_prompts, prompt_tokens + sampling.gen_length)
    else:
        raise ConfigError("this model has no tokenizer: pass --prompts with prompts it can read")
    references = teacher_runs(
        teacher, prompts, sampling, teacher.spec, batch_size=args.batch_size, device=teacher.device
    )
    report = parity_report(
        teacher, student, prompts, sampling, nll_windows=nll_windows, quiet=args.quiet, references=references,
        post_commit_probes=args.post_commit_probes,
    )  # fmt: skip
    report["backend"] = args.backend
    if artifact is not None:
        report.update(method=artifact.config.method, format=artifact.config.format, artifact=str(args.artifact))
        if args.backend != "torch":  # the exported student against the PyTorch one it was exported from
            torch_student = fake_quant_student(teacher, artifact)
            report["vs_fake_quant"] = decision_agreement(student, torch_student, references, sampling, teacher.spec)
    if args.json:
        print(json.dumps(report))
    else:
        for name in (*PARITY_METRICS, "post_commit_mismatch_teacher", "masked_nll_fp", "masked_nll_q"):
            value = report.get(name)
            print(f"{name:28s} {value:.4f}" if isinstance(value, float) else f"{name:28s} {value}")
        if "vs_fake_quant" in report:
            print(f"{'agreement_vs_fake_quant':28s} {report['vs_fake_quant']['decision_agreement']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from faircalib.calib.bench import BenchConfig, run_bench

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if v is not None})
    run_bench(cfg)
    print(f"wrote {cfg.out}/results.json, results.md and flip_curves_*.svg", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from faircalib.exporter.onnx_export import export_bundle
    from faircalib.models import load_denoiser

    path = args.model if args.model is not None else _default_model()
    sampling = None
    if any(getattr(args, name) is not None for name in ("gen_length", "block_length", "steps", "temperature")):
        sampling = sampling_from_args(args, load_denoiser(path).spec)
    out = export_bundle(path, args.artifact, args.profile, args.out, sampling=sampling, opset=args.opset)
    print(f"wrote {out} ({args.profile})", file=sys.stderr)
    return 0


def _default_model() -> Path:
    from faircalib.zoo import model_dir

    return model_dir()


def cmd_build_engine(args: argparse.Namespace) -> int:
    from faircalib.runtime.tensorrt import EngineConfig, build_engine

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    cfg = EngineConfig(**{k: v for k, v in fields.items() if v is not None})
    out = build_engine(args.onnx, args.out, cfg)
    print(f"wrote {out}/model.engine", file=sys.stderr)
    return 0


def student_backend(kind: str, bundle: Path | None):
    """The exported student of a bundle on ONNX Runtime or TensorRT."""
    if bundle is None:
        raise ConfigError(f"--backend {kind} needs --onnx BUNDLE_DIR (an export, or an engine directory for trt)")
    if kind == "trt":
        from faircalib.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle)
    from faircalib.runtime.backends import OrtBackend

    return OrtBackend(bundle)


def cmd_latency(args: argparse.Namespace) -> int:
    from faircalib.models import load_denoiser, parse_dtype
    from faircalib.runtime.backends import OrtBackend, TorchBackend, bundle_manifest
    from faircalib.runtime.latency import step_latency

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model if args.model is not None else _default_model()
    model = load_denoiser(path, parse_dtype(args.dtype), args.device)
    backends = [("torch-" + args.dtype, TorchBackend(model))]
    for bundle in args.onnx or []:
        backends.append((bundle_manifest(bundle)["profile"], OrtBackend(bundle, threads=args.threads)))
    rows = []
    for name, backend in backends:
        row = {
            "backend": name,
            **step_latency(backend, args.batch, args.seq, model.spec.vocab_size, repeats=args.repeats),
        }
        rows.append(row)
        print(f"{name:14s} batch {args.batch} seq {args.seq}: {row['median_ms']:.2f} ms (p90 {row['p90_ms']:.2f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(path), "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


def cmd_check_onnx(args: argparse.Namespace) -> int:
    from faircalib.exporter.trt_rules import check_tensorrt

    if not args.onnx.is_file():
        raise ConfigError(f"ONNX file not found: {args.onnx}")
    violations = check_tensorrt(args.onnx)
    for violation in violations:
        print(violation)
    print(f"{args.onnx}: {len(violations)} TensorRT rule violation(s)", file=sys.stderr)
    return 1 if violations else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faircalib", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    gen = verbs.add_parser("generate", help="generate with the full-precision model or an exported bundle")
    _add_model_args(gen)
    gen.add_argument("--backend", choices=("torch", "ort", "trt"), default="torch")
    gen.add_argument("--onnx", type=Path, help="exported bundle (ort) or engine directory (trt)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer files in the model directory)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    _add_sampling_args(gen)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=cmd_generate)

    from faircalib.calib.config import METHODS, QuantConfig

    cal = verbs.add_parser("calibrate", help="calibrate a quantized student (FAIR-Calib or a baseline)")
    _add_model_args(cal)
    cal.add_argument("--method", choices=METHODS, default="fair")
    cal.add_argument("--calib-prompts", type=Path, help="one prompt per line (default: Wikipedia calib split)")
    cal.add_argument(
        "--prompt-tokens",
        type=int,
        help=f"prompt length: the openings of the default data (default {DEFAULT_PROMPT_TOKENS}), or of each line of "
        "--calib-prompts when given",
    )
    cal.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    cal.add_argument("--quiet", action="store_true")
    add_dataclass_args(cal.add_argument_group("quantization (defaults: the method's preset)"), QuantConfig, ("method",))
    _add_sampling_args(cal)
    cal.set_defaults(run=cmd_calibrate)

    par = verbs.add_parser("parity", help="decision parity of a calibrated student against the FP teacher")
    _add_model_args(par)
    par.add_argument("--backend", choices=("torch", "ort", "trt"), default="torch")
    par.add_argument("--artifact", type=Path, help="the calibrated student (torch backend), or its source (ort)")
    par.add_argument("--onnx", type=Path, help="exported bundle (ort) or engine directory (trt)")
    par.add_argument("--prompts", type=Path, help="one prompt per line (default: Wikipedia eval split)")
    par.add_argument("--n-prompts", type=int, default=64)
    par.add_argument(
        "--prompt-tokens",
        type=int,
        help=f"prompt length: the openings of the default data (default {DEFAULT_PROMPT_TOKENS}), or of each line of "
        "--prompts when given",
    )
    par.add_argument("--batch-size", type=int, default=16)
    par.add_argument(
        "--post-commit-probes",
        type=int,
        default=4,
        help="committed positions masked again per row and step to estimate the post-commit metrics: more costs "
        "forwards and lowers their noise (default 4)",
    )
    par.add_argument("--json", action="store_true")
    par.add_argument("--quiet", action="store_true")
    _add_sampling_args(par)
    par.set_defaults(run=cmd_parity)

    from faircalib.calib.bench import BenchConfig

    bench = verbs.add_parser("bench", help="every method x format x seed on one model: parity, time, memory")
    add_dataclass_args(bench, BenchConfig)
    bench.set_defaults(run=cmd_bench)

    from faircalib.exporter.onnx_export import OPSET, PROFILES

    exp = verbs.add_parser("export", help="write the deployable bundle: QDQ ONNX + schedule.json + tokenizer")
    exp.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    exp.add_argument("--artifact", type=Path, help="calibrated student to export (not for ort-fp32)")
    exp.add_argument("--profile", choices=tuple(PROFILES), required=True)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--opset", type=int, default=OPSET)
    _add_sampling_args(exp)
    exp.set_defaults(run=cmd_export)

    lat = verbs.add_parser("latency", help="per-step latency of the FP model and exported bundles")
    _add_model_args(lat)
    lat.add_argument("--onnx", type=Path, nargs="*", help="exported bundle directories (ONNX Runtime)")
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--seq", type=int, default=48)
    lat.add_argument("--repeats", type=int, default=20)
    lat.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the library default)")
    lat.add_argument("--out", type=Path, help="write the rows as JSON")
    lat.set_defaults(run=cmd_latency)

    from faircalib.runtime.tensorrt import EngineConfig

    eng = verbs.add_parser("build-engine", help="build a TensorRT engine from an exported bundle (needs a GPU)")
    eng.add_argument("--onnx", type=Path, required=True, help="exported bundle directory")
    eng.add_argument("--out", type=Path, required=True, help="engine directory to write")
    add_dataclass_args(eng, EngineConfig)
    eng.set_defaults(run=cmd_build_engine)

    check = verbs.add_parser(
        "check-onnx", help="check an ONNX file against TensorRT's int4 weight-only and INT8 Q/DQ rules"
    )
    check.add_argument("onnx", type=Path)
    check.set_defaults(run=cmd_check_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FaircalibError as err:
        print(f"faircalib: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
