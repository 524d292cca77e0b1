"""`faircalib <verb>`: a thin layer from flags to the library. Flags map one to one onto config fields."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from faircalib.cli import commands, measure
from faircalib.cli.parser import (
    add_backend_args,
    add_dataclass_args,
    add_model_args,
    add_prompt_args,
    add_quiet,
    add_sampling_args,
)
from faircalib.errors import FaircalibError


def build_parser() -> argparse.ArgumentParser:
    from faircalib.bench import BenchConfig
    from faircalib.calib.config import METHODS, QuantConfig
    from faircalib.exporter.profiles import OPSET, PROFILES
    from faircalib.runtime.tensorrt import EngineConfig

    parser = argparse.ArgumentParser(prog="faircalib", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    overwrite = {"action": "store_true", "help": "replace --out even when it holds files faircalib did not write"}

    gen = verbs.add_parser("generate", help="generate with the full-precision model or an exported bundle")
    add_model_args(gen)
    add_backend_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", help="prompt text, read by the model's tokenizer (no default: give it or --prompt-ids)"
    )
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (no default: give it or --prompt)")
    gen.add_argument("--artifact", type=Path, help="generate with this calibrated student (--backend torch or "
                     "triton; default: none, the full-precision model)")  # fmt: skip
    add_sampling_args(gen)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    add_quiet(gen)
    gen.set_defaults(run=commands.cmd_generate)

    cal = verbs.add_parser("calibrate", help="calibrate a quantized student (FAIR-Calib or a baseline)")
    add_model_args(cal)
    cal.add_argument("--method", choices=METHODS, default="fair", help="calibration method (default: fair)")
    cal.add_argument("--target", choices=[p for p, prof in PROFILES.items() if prof.quantized],
                     help="the export profile to calibrate for: sets the bits, group size, symmetry and activation "
                     "scales it takes, and refuses flags it cannot express (default: none)")  # fmt: skip
    add_prompt_args(cal, "--calib-prompts", "calib", None)
    cal.add_argument("--calib-source", choices=("dataset", "self"), default="dataset", help="calibration prompts: "
                     "--calib-prompts or the built-in split (dataset), or written by the model itself at "
                     "temperature 1 (self: a checkpoint is all it needs) (default: dataset)")  # fmt: skip
    cal.add_argument("--out", type=Path, required=True, help="artifact directory to write (OUT.partial/ while running)")
    cal.add_argument("--overwrite", **overwrite)
    add_quiet(cal)
    preset_default = "the method's preset"
    add_dataclass_args(cal.add_argument_group("quantization (defaults: the method's preset for the format)"),
                       QuantConfig, ("method",), preset_default)  # fmt: skip
    add_sampling_args(cal)
    cal.set_defaults(run=commands.cmd_calibrate)

    par = verbs.add_parser("parity", help="decision parity of a calibrated student against the FP teacher")
    add_model_args(par)
    add_backend_args(par)
    par.add_argument("--artifact", type=Path, help="the calibrated student (torch backend), or the one the "
                     "bundle was exported from, also compared with it (default: none)")  # fmt: skip
    add_prompt_args(par, "--prompts", "eval", 64)
    par.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
    par.add_argument("--post-commit-probes", type=int, default=4,
                     help="committed positions masked again per row and step to estimate the post-commit metrics: "
                     "more costs forwards and lowers their noise (default: 4)")  # fmt: skip
    par.add_argument("--json", action="store_true", help="print the whole report, curves included, as JSON")
    par.add_argument("--report", type=Path, help="write report.html with figures of where decisions break to this "
                     "directory (default: none)")  # fmt: skip
    par.add_argument("--gate", help="ship gate, e.g. \"frontier_flip_rate<=0.03,exact_match>=0.2\": exit 1 with a line "
                     "per metric that misses (default: none)")  # fmt: skip
    add_quiet(par)
    add_sampling_args(par)
    par.set_defaults(run=measure.cmd_parity)

    ev = verbs.add_parser("eval", help="lm-evaluation-harness tasks on the teacher or a student (local task files)")
    add_model_args(ev)
    add_backend_args(ev)
    ev.add_argument("--artifact", type=Path, help="evaluate this calibrated student (torch backend), or check the "
                    "bundle against it (default: none: --backend torch evaluates the teacher)")  # fmt: skip
    ev.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names found under --include-path, task "
                    "YAML files, or mini_sudoku (a task model's held-out problems)")  # fmt: skip
    ev.add_argument("--include-path", type=Path, nargs="*", help="directories of lm-eval task YAML (default: none)")
    ev.add_argument("--limit", type=int, help="examples per task (default: all; mini_sudoku: 500)")
    ev.add_argument("--mc-num", type=int, default=32, help="masked samples per loglikelihood estimate (default: 32)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    ev.add_argument("--out", type=Path, help="write the scores and every example's response as JSON (default: none)")
    add_sampling_args(ev)
    ev.set_defaults(run=measure.cmd_eval)

    bench = verbs.add_parser("bench", help="every method x format x seed on one model: parity, time, memory; "
                             "writes results.json, results.md and report.html to --out")  # fmt: skip
    add_dataclass_args(bench, BenchConfig)
    bench.set_defaults(run=commands.cmd_bench)

    exp = verbs.add_parser("export", help="write the deployable bundle: QDQ ONNX + schedule.json + tokenizer")
    exp.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled model)")
    exp.add_argument("--artifact", type=Path, help="calibrated student to export (default: none, for ort-fp32)")
    exp.add_argument("--profile", choices=tuple(PROFILES), required=True, help="target runtime and format")
    exp.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    exp.add_argument("--overwrite", **overwrite)
    exp.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    exp.add_argument("--parity-report", type=Path, help="a `parity --json` report to record in the bundle's "
                     "manifest, with the gate it passed (default: none)")  # fmt: skip
    add_sampling_args(exp)
    exp.set_defaults(run=commands.cmd_export)

    lat = verbs.add_parser("latency", help="per-step latency (forward and decision) and peak memory of the FP "
                           "model, an artifact's student on PyTorch and on Triton, and exported bundles")  # fmt: skip
    add_model_args(lat)
    lat.add_argument("--artifact", type=Path, help="also time this calibrated student, fake-quant on PyTorch and on "
                     "the Triton kernels (default: none)")  # fmt: skip
    lat.add_argument("--onnx", type=Path, nargs="*", help="exported bundle directories to time on ONNX Runtime "
                     "(default: none)")  # fmt: skip
    lat.add_argument("--batch", type=int, default=1, help="sequences per forward (default: 1)")
    lat.add_argument("--seq", type=int, help="tokens per sequence (default: 16 prompt tokens + the gen length)")
    lat.add_argument("--repeats", type=int, default=20, help="timed steps (default: 20)")
    lat.add_argument("--threads", type=int, default=0, help="intra-op threads (default: 0, the library's choice)")
    lat.add_argument("--out", type=Path, help="write the rows as JSON (default: print only)")
    add_sampling_args(lat)
    lat.set_defaults(run=measure.cmd_latency)

    eng = verbs.add_parser("build-engine", help="build a TensorRT engine from an exported bundle (needs a GPU)")
    eng.add_argument("--onnx", type=Path, required=True, help="exported bundle directory")
    eng.add_argument("--out", type=Path, required=True, help="engine directory to write")
    eng.add_argument("--overwrite", **overwrite)
    add_dataclass_args(eng, EngineConfig)
    eng.set_defaults(run=commands.cmd_build_engine)

    check = verbs.add_parser("check-onnx", help="check an ONNX file against TensorRT's int4 and INT8 Q/DQ rules")
    check.add_argument("onnx", type=Path, help="the model.onnx to check")
    check.set_defaults(run=commands.cmd_check_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; a user's mistake ends in one ``faircalib: error:`` line (exit 2), Ctrl-C in one line saying
    what was kept (exit 130)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FaircalibError as err:
        print(f"faircalib: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "interrupted", None) or "nothing was written"
        print(f"\nfaircalib: interrupted: {kept}", file=sys.stderr)
        return 130
