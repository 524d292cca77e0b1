"""The command line's argument table: every flag, its help line and its default. Flags that configure
calibration, the benchmark or an engine map one to one onto their config's fields."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from faircalib.data import DEFAULT_PROMPT_TOKENS

FIELD_HELP = {
    # QuantConfig
    "wbits": "weight bits",
    "abits": "activation bits (16: weight-only)",
    "group_size": "weights per scale along K (default: one scale per output channel)",
    "w_symmetric": "signed weight codes without zero points (--no-w-symmetric: unsigned codes with zero points)",
    "w_fp16_scales": "weight scales rounded to fp16, as GGUF's Q4_0 / Q8_0 blocks store them",
    "a_symmetric": "symmetric per-token activation quantization",
    "a_group_size": "one activation scale per token and block of this many inputs (llama.cpp's: 32; default: "
    "one per token)",
    "a_clip_ratio": "starting activation clip ratio in (0, 1]",
    "a_static": "one calibrated scale per tensor for 8-bit activations (TensorRT INT8) instead of per token",
    "solver": "how weights are rounded: GPTQ against the token-weighted Hessian, or round to nearest",
    "damp": "GPTQ's relative damping of the Hessian diagonal",
    "act_order": "GPTQ quantizes columns in order of decreasing Hessian diagonal",
    "rotate": "QuaRot's randomized Hadamard on the residual stream (pre-norm RMSNorm models only)",
    "rotation_steps": "steps of the residual rotation learned on top of the Hadamard (0: the Hadamard alone)",
    "rotation_lr": "the learned rotation's first Adam step size, decayed to zero on a cosine",
    "rotation_batch": "calibration states per step of the learned rotation",
    "block_transforms": "learn per-block value-head transforms and channel scales with the rotation",
    "smooth": "SmoothQuant's channel migration between each norm and the linears reading it",
    "smooth_alpha": "SmoothQuant's migration strength in [0, 1]",
    "states": "what to calibrate on: the teacher's own decoding states, or plain text windows",
    "n_prompts": "calibration prompts",
    "states_per_prompt": "teacher states kept per prompt, evenly spaced over its denoising steps",
    "seed": "seed of the Hadamard, the learned parts' minibatches, and the calibration data slice of bench",
    "weighting": "token weights: FAIR-Calib's frontier prior, or uniform",
    "lam": "prior mix: 1 frontier hits only, 0 masked-stage instability only",
    "beta": "how strongly the prior raises a fragile token's weight",
    "w_min": "lowest token weight",
    "w_max": "highest token weight",
    "tau": "width of the commit-threshold closeness that makes a decision fragile",
    "reconstruct": "learn rounding offsets, scale multipliers and activation clips per block after GPTQ",
    "recon_steps": "reconstruction steps per block",
    "recon_lr": "the reconstruction's first Adam step size, decayed to zero on a cosine",
    "recon_batch": "calibration states per reconstruction step",
    "head_weight": "weight of the logits-level KL in the last block's reconstruction (0: off)",
    "promote_budget": "keep the linears that matter most at 8 bits, within this many percent of extra weight bits",
    "promote_by": "what picks them: how far each linear moves the teacher's decisions, or HAWQ's Hessian trace",
    "promote_states": "calibration states the linears are scored on",
    # BenchConfig
    "model": "checkpoint directory",
    "methods": "calibration methods to compare",
    "formats": "weight / activation formats",
    "seeds": "calibration seeds (seed s takes the s-th slice of the calibration split)",
    "n_calib_prompts": "calibration prompts per run",
    "n_eval_prompts": "held-out evaluation prompts",
    "eval_windows_per_article": "evaluation prompts taken per held-out article",
    "n_nll_windows": "masked-NLL windows (default: as many as evaluation prompts)",
    "prompt_tokens": "prompt length in tokens",
    "gen_length": "generated tokens",
    "block_length": "semi-autoregressive block length",
    "steps": "denoising steps",
    "post_commit_probes": "committed positions masked again per row and step for the post-commit metrics",
    "out": "output directory: results.json, results.md and report.html with its figures",
    "overrides": "QuantConfig fields for every run as FIELD=VALUE, e.g. rotation_steps=0 block_transforms=false",
    "reuse_artifacts": "measure parity again on the artifacts of an earlier run in --out, keeping its times",
    "calib_source": "calibration prompts: the dataset's, or written by the teacher itself (no data needed)",
    # EngineConfig
    "min_seq": "shortest sequence the engine takes",
    "opt_seq": "sequence length the engine is tuned for",
    "max_seq": "longest sequence the engine takes",
    "opt_batch": "batch size the engine is tuned for",
    "max_batch": "largest batch the engine takes",
    "workspace_gib": "builder workspace in GiB",
    "fp16": "weakly typed network with fp16 kernels (for graphs without Q/DQ)",
    "int8": "weakly typed network with INT8 kernels (for graphs without Q/DQ)",
}


def add_dataclass_args(parser, cls, exclude: tuple[str, ...] = (), preset_default: str | None = None) -> None:
    """One ``--field-name`` flag per dataclass field, with its help line and default (flags default to None:
    the class default, or ``preset_default``'s wording where the field's default is None)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        is_union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if is_union else kind
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        shown = preset_default if default is None and preset_default else default
        help_text = f"{FIELD_HELP[field.name]} (default: {shown})"
        if typing.get_origin(base) is tuple:
            parser.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=None, help=help_text)
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=None, metavar=base.__name__.upper(), help=help_text)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from faircalib.zoo import DEFAULT_MODEL

    parser.add_argument("--model", type=Path, help=f"checkpoint directory (default: the bundled {DEFAULT_MODEL})")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="weights' dtype (default: auto, bf16 on a GPU and fp32 on the CPU)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto, CUDA when present)")
    parser.add_argument("--stream-blocks", action="store_true", help="keep the blocks in host memory, each on the "
                        "device only while it runs: a model larger than the device (default: all on it)")  # fmt: skip


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults: the family's reference sampler, or the artifact's)")
    group.add_argument("--gen-length", type=int, help="tokens to generate (reference: 128)")
    group.add_argument("--block-length", type=int, help="semi-autoregressive block (LLaDA; default: gen length)")
    group.add_argument("--steps", type=int, help="denoising steps (default: gen length)")
    group.add_argument("--temperature", type=float, help="sampling temperature (default: 0, greedy)")
    group.add_argument("--remasking", choices=("low_confidence", "random", "left_to_right"),
                       help="LLaDA's commit order (default: low_confidence)")  # fmt: skip
    group.add_argument("--cfg-scale", type=float, help="classifier-free guidance, LLaDA only (default: 0)")
    group.add_argument("--logits-eos-inf", action="store_true", default=None, help="LLaDA: never sample EOS")
    group.add_argument("--confidence-eos-eot-inf", action="store_true", default=None,
                       help="LLaDA: never commit EOS/EoT early")  # fmt: skip
    group.add_argument("--alg", choices=("origin", "maskgit_plus", "topk_margin", "entropy"),
                       help="Dream's unmasking order (default: origin)")  # fmt: skip
    group.add_argument("--alg-temp", type=float, help="Dream only (default: none)")
    group.add_argument("--top-p", type=float, help="Dream only (default: none)")
    group.add_argument("--top-k", type=int, help="Dream only (default: none)")
    group.add_argument("--eps", type=float, help="Dream only: final timestep (default: 0.001)")


def add_prompt_args(parser: argparse.ArgumentParser, flag: str, split: str, n_default: int | None) -> None:
    parser.add_argument(flag, type=Path, help=f"UTF-8 file, one prompt per line (default: Wikipedia {split} split)")
    if n_default is not None:
        parser.add_argument("--n-prompts", type=int, default=n_default, help=f"prompts (default: {n_default})")
    parser.add_argument(
        "--prompt-tokens", type=int, help=f"prompt length: the openings of the default data (default: "
        f"{DEFAULT_PROMPT_TOKENS}), or of each line of {flag} (default: whole lines)",
    )  # fmt: skip


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


BACKENDS = ("torch", "triton", "ort", "trt", "llamacpp")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="what runs the student: PyTorch, "
                        "our Triton kernels (an --artifact's student; their torch references without a GPU), "
                        "ONNX Runtime, TensorRT or llama.cpp (default: torch)")  # fmt: skip
    parser.add_argument("--bundle", "--onnx", dest="onnx", type=Path, help="exported bundle (ort, llamacpp) or "
                        "engine directory (trt) (default: none; needed by every backend but torch)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="the backend's CPU threads (default: 0, its choice)")
