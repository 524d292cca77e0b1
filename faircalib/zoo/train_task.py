"""Train the bundled task model: a small LLaDA that solves 4x4 mini sudoku (faircalib.zoo.tasks).

Objective: LLaDA's supervised fine-tuning loss from scratch. The puzzle is always visible; per example
t ~ U(eps, 1), each answer token is masked with probability t, loss = sum over masked answer tokens of CE / t,
divided by the answer's length. Every step draws a fresh batch from a fixed pool of generated problems.

    python -m faircalib.zoo.train_task --out faircalib/zoo/llada-sudoku-tiny --minutes 60 [--init-from DIR]

Writes the real LLaDA checkpoint layout, a character-level tokenizer and train_log.json (with held-out
accuracy under low-confidence and random decoding) every ``--save-every`` steps and at the end.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from faircalib.data import TASK_FILE
from faircalib.files import write_json_atomic
from faircalib.models.llada import LLaDA, LLaDAConfig
from faircalib.models.tiny import randomize_
from faircalib.sampling import LLaDASampling, generate
from faircalib.zoo import tasks
from faircalib.zoo.train import EOS, MASK, PAD, run_steps, save

GEN_LENGTH = tasks.ANSWER_CHARS + 1  # the answer and its end-of-text token


@dataclass(frozen=True)
class TaskTrainConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden_size: int = 384
    pool: int = 100_000  # training problems generated once
    batch_size: int = 128
    steps: int = 6000
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.1
    mask_eps: float = 1e-3
    held_out: int = 500
    seed: int = 0


def char_tokenizer():
    """One token per character of the task's alphabet, plus end-of-text, mask and padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, MASK: 1, PAD: 2, **{c: i + 3 for i, c in enumerate(tasks.ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, mask_token=MASK, pad_token=PAD)


def encode(tokenizer, items: list[tasks.Problem]) -> tuple[torch.Tensor, int]:
    """[N, prompt + answer + EOS] ids of ``items`` and the prompt's length (the same for every problem)."""
    ids = [tokenizer(p.prompt + p.answer)["input_ids"] + [tokenizer.eos_token_id] for p in items]
    return torch.tensor(ids, dtype=torch.long), len(items[0].prompt)


def sft_loss(model: LLaDA, x: torch.Tensor, prompt: int, mask_id: int, eps: float, g: torch.Generator):
    b, answer = x.shape[0], x.shape[1] - prompt
    t = (1 - eps) * torch.rand(b, 1, generator=g) + eps
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, prompt:] = torch.rand(b, answer, generator=g) < t
    logits = model(torch.where(masked, mask_id, x))
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    return (ce / t.expand_as(x)[masked]).sum() / (b * answer)


@torch.no_grad()
def solve_rate(model: LLaDA, tokenizer, items: list[tasks.Problem], remasking: str = "low_confidence") -> float:
    """The fraction of ``items`` the model solves, decoding one token a step (verified by reasoning-gym)."""
    sampling = LLaDASampling(gen_length=GEN_LENGTH, block_length=GEN_LENGTH, steps=GEN_LENGTH, remasking=remasking)
    solved = 0
    for start in range(0, len(items), 64):
        batch = items[start : start + 64]
        prompts = torch.tensor([tokenizer(p.prompt)["input_ids"] for p in batch])
        written = generate(model, prompts, sampling, model.spec, seed=start).generated
        texts = tokenizer.batch_decode(written, skip_special_tokens=True)
        solved += sum(tasks.verify(p, text) for p, text in zip(batch, texts, strict=True))
    return solved / len(items)


def build(cfg: TaskTrainConfig, tokenizer, init_from: Path | None) -> LLaDA:
    model_cfg = LLaDAConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        eot_token_id=None, max_sequence_length=64,
    )  # fmt: skip
    if init_from is not None:
        from faircalib.models import load_denoiser

        model = load_denoiser(init_from).requires_grad_(True)
        if model.config != model_cfg:
            raise SystemExit(f"{init_from} has another architecture than the flags ask for")
        return model
    model = LLaDA(model_cfg)
    randomize_(model, cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(0.02 if "wte" in name else 0.5)
    return model


def task_record(cfg: TaskTrainConfig, unseen: list[int]) -> dict:
    """task.json: which task the model solves, the schedule it is decoded with, what it was trained on."""
    sampling = dict(gen_length=GEN_LENGTH, block_length=GEN_LENGTH, steps=GEN_LENGTH)
    return {"task": tasks.TASK, "generator": tasks.GENERATOR, "training_problems": cfg.pool,
            "train_seed": tasks.TRAIN_SEED, "held_out_seed": tasks.HELD_OUT_SEED, "calib_seed": tasks.CALIB_SEED,
            "held_out_unseen": unseen, "sampling": sampling}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--init-from", type=Path, default=None, help="continue from a checkpoint this script wrote")
    for field, value in asdict(TaskTrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = TaskTrainConfig(**{k: getattr(args, k) for k in asdict(TaskTrainConfig())})
    tokenizer = char_tokenizer()
    training = tasks.training_problems(cfg.pool)
    data, prompt = encode(tokenizer, training)
    unseen = tasks.unseen_held_out(training)
    held_out = tasks.held_out_problems(cfg.held_out, unseen)
    model = build(cfg, tokenizer, args.init_from)
    log = {"train_config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
           "task": {"name": tasks.TASK, "generator": tasks.GENERATOR, "train_seed": tasks.TRAIN_SEED,
                    "held_out_seed": tasks.HELD_OUT_SEED}, "history": []}  # fmt: skip
    train_loop(args, cfg, model, tokenizer, (data, prompt), held_out, log, task_record(cfg, unseen))


def train_loop(args, cfg: TaskTrainConfig, model: LLaDA, tokenizer, encoded, held_out, log: dict, task: dict) -> None:
    """LLaDA's SFT loss on batches of the training pool (``encoded``: its ids and prompt length); held-out problems
    solved at each checkpoint, which writes the model, its log and ``task`` (task.json)."""
    data, prompt = encoded

    def loss_of(generator: torch.Generator) -> torch.Tensor:
        batch = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=generator)]
        return sft_loss(model, batch, prompt, tokenizer.mask_token_id, cfg.mask_eps, generator)

    def checkpoint(steps: int, loss: float, minutes: float) -> None:
        solved = {r: solve_rate(model, tokenizer, held_out, r) for r in ("low_confidence", "random")}
        log["history"].append({"step": steps, "train_loss": loss, "minutes": minutes, **solved})
        print(f"  held-out solved: low-confidence {solved['low_confidence']:.3f}  random {solved['random']:.3f}",
              flush=True)  # fmt: skip
        log["steps_done"], log["train_minutes"] = steps, minutes
        save(model, tokenizer, args.out, log)
        write_json_atomic(args.out / TASK_FILE, task)

    run_steps(args, cfg, model, loss_of, checkpoint)


if __name__ == "__main__":
    main()
