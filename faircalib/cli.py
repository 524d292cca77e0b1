"""`faircalib <verb>`: a thin layer from flags to the library. Flags map one to one onto config fields."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from faircalib.errors import ConfigError, FaircalibError


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


_LLADA_ONLY = ("block_length", "remasking", "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf")
_DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")


def sampling_from_args(args: argparse.Namespace, spec):
    """Build the family's sampling config from the flags that were given; reject flags it does not have."""
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
    return default_sampling(spec, **overrides)


def _load_model(args: argparse.Namespace):
    from faircalib.models import load_denoiser, load_tokenizer, parse_dtype
    from faircalib.zoo import model_dir

    path = args.model if args.model is not None else model_dir()
    model = load_denoiser(path, parse_dtype(args.dtype), args.device)
    return path, model, load_tokenizer(path)


def encode_prompt(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(tok) for tok in args.prompt_ids.split(",") if tok.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: pass --prompt-ids instead of --prompt")
    ids = list(tokenizer(args.prompt)["input_ids"])
    # A tokenizer that closes every text with [SEP]/EOS would tell the denoiser the text is over.
    end_markers = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    while ids and ids[-1] in end_markers:
        ids.pop()
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from faircalib.sampling import generate, plan

    path, model, tokenizer = _load_model(args)
    sampling = sampling_from_args(args, model.spec)
    prompt_ids = encode_prompt(args, tokenizer)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    schedule = plan(sampling, len(prompt_ids))
    with tqdm(total=len(schedule.steps), desc="denoising", unit="step", disable=args.quiet, file=sys.stderr) as bar:

        def denoise(tokens: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return model(tokens)

        result = generate(denoise, prompt, sampling, model.spec, seed=args.seed, schedule=schedule)
    generated = result.generated[0].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        payload = {
            "model": str(path),
            "family": model.spec.family,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faircalib", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    gen = verbs.add_parser("generate", help="generate with the full-precision model")
    _add_model_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer files in the model directory)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    _add_sampling_args(gen)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=cmd_generate)
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
