"""Prompts and text for calibration and evaluation: a user's prompts file, or the offline Wikipedia splits
the bundled model was trained beside (calibration and evaluation never see its training articles)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from faircalib.errors import ConfigError
from faircalib.models.tokenizer import encode_prompt
from faircalib.zoo import wiki

DEFAULT_PROMPT_TOKENS = 16
TASK_FILE = "task.json"  # in a task model's directory: which task it solves


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; errors name the file (and the line)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"prompts file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read the prompts file {path}: {err.strerror}") from None
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}, line {number}: not UTF-8 text (byte {err.start + 1} of the line)") from None
        if text:
            lines.append(text)
    if not lines:
        raise ConfigError(f"{path} holds no prompts")
    return lines


def read_prompt_file(path: Path, tokenizer: Any, limit: int | None, max_tokens: int | None = None) -> list[list[int]]:
    """One prompt per non-empty line (the first ``limit`` lines); lines may be whole documents, so
    ``max_tokens`` keeps only their openings."""
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer files: a prompts file needs one")
    return [encode_prompt(tokenizer, line)[:max_tokens] for line in read_lines(path)[:limit]]


@dataclass(frozen=True)
class PromptData:
    prompts: list[list[int]]
    text_windows: torch.Tensor | None  # [N, prompt + gen] plain text (text calibration, masked NLL)
    description: dict[str, Any]
    judge: Callable[[list[int], list[int]], bool] | None = None  # (prompt ids, generated ids) -> right answer?


def task_of(model_dir: Path | None) -> dict[str, Any] | None:
    """The task a bundled task model solves (its task.json), or None for a language model."""
    path = Path(model_dir) / TASK_FILE if model_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def task_data(tokenizer: Any, task: dict[str, Any], n: int, split: str, offset: int = 0) -> PromptData:
    """Problems ``offset`` to ``offset + n`` of a task model's ``split`` ("calib" or "eval"), with a judge of the
    answers written."""
    from faircalib.zoo import tasks

    if split == "eval":
        problems = tasks.held_out_problems(offset + n, task["held_out_unseen"])[offset:]
    else:
        problems = tasks.calibration_problems(offset + n)[offset:]
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    by_prompt = {tuple(ids): p for ids, p in zip(prompts, problems, strict=True)}
    # the solved sequences, EOS to the end of the generation: text calibration's windows, masked NLL's texts
    length = len(prompts[0]) + task["sampling"]["gen_length"]
    answers = [tokenizer(p.answer, add_special_tokens=False)["input_ids"] for p in problems]
    solved = [
        (ids + answer + [tokenizer.eos_token_id] * length)[:length]
        for ids, answer in zip(prompts, answers, strict=True)
    ]
    windows = torch.tensor(solved, dtype=torch.long)

    def judge(prompt: list[int], generated: list[int]) -> bool:
        return tasks.verify(by_prompt[tuple(prompt)], tokenizer.decode(generated, skip_special_tokens=True))

    description = {"source": f"{tasks.TASK} {split} problems {offset} to {offset + n}", "problems": n}
    return PromptData(prompts, windows, description, judge)


def calibration_data(
    tokenizer: Any, n: int, prompt_tokens: int | None, gen_length: int, path: Path | None, text: bool,
    task: dict[str, Any] | None = None,
) -> PromptData:  # fmt: skip
    """``n`` calibration prompts of ``prompt_tokens`` (from ``path``, else the Wikipedia calib split) and, for
    ``text`` calibration, windows of ``prompt_tokens + gen_length`` tokens of the same text."""
    length = (prompt_tokens or DEFAULT_PROMPT_TOKENS) + gen_length
    if path is None and task is not None and not text:
        return task_data(tokenizer, task, n, "calib")
    if path is None:
        if tokenizer is None:
            raise ConfigError("this model has no tokenizer: pass --calib-prompts with prompts it can read")
        tokens = prompt_tokens or DEFAULT_PROMPT_TOKENS
        windows = wiki.text_windows(tokenizer, "calib", n, length) if text else None
        description = {"source": "wikipedia leads, calib split", "prompt_tokens": tokens}
        return PromptData(wiki.prompt_ids(tokenizer, "calib", n, tokens), windows, description)
    windows = None
    if text:
        long_enough = [p[:length] for p in read_prompt_file(path, tokenizer, n) if len(p) >= length]
        if not long_enough:
            raise ConfigError(f"no line of {path} has {length} tokens for text calibration")
        windows = torch.tensor(long_enough, dtype=torch.long)
    description = {"source": str(path), "prompt_tokens": prompt_tokens}
    return PromptData(read_prompt_file(path, tokenizer, n, prompt_tokens), windows, description)


@torch.no_grad()
def self_written_data(model: Any, n: int, prompt_tokens: int | None, gen_length: int, seed: int = 0) -> PromptData:
    """Calibration data the teacher writes itself, for a user with nothing but the checkpoint.

    Each of ``n`` sequences of ``prompt_tokens + gen_length`` opens with one token drawn from the teacher's
    own distribution at the first position of a fully masked sequence (specials excluded); its reference
    sampler writes the rest at temperature 1. The first ``prompt_tokens`` are the prompt, the whole sequence a
    text window."""
    from faircalib.sampling import default_sampling, generate

    tokens = prompt_tokens or DEFAULT_PROMPT_TOKENS
    length, spec = tokens + gen_length, model.spec
    masked = torch.full((1, length), spec.mask_token_id, dtype=torch.long, device=model.device)
    first = model(masked)[0, 0].float().cpu()
    first[[spec.mask_token_id, *spec.eos_token_ids]] = float("-inf")
    openings = torch.multinomial(first.softmax(-1), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    # sampled at temperature 1, as the teacher's own distribution: greedy decoding from one token repeats itself
    lengths = {"gen_length": length - 1, "steps": length - 1, "temperature": 1.0}
    sampling = default_sampling(spec, **lengths, **({} if spec.sampler == "dream" else {"block_length": length - 1}))
    rows = []
    for batch in openings.split(16):
        written = generate(model, batch.unsqueeze(1), sampling, spec, seed=seed).generated.cpu()
        rows.append(torch.cat([batch.unsqueeze(1), written], dim=1))
    windows = torch.cat(rows)
    description = {"source": "self-written by the teacher", "prompt_tokens": tokens, "seed": seed}
    return PromptData(windows[:, :tokens].tolist(), windows, description)


def evaluation_data(
    tokenizer: Any, n: int, prompt_tokens: int | None, gen_length: int, path: Path | None,
    task: dict[str, Any] | None = None,
) -> PromptData:  # fmt: skip
    """``n`` held-out prompts (from ``path``; else a task model's held-out problems, with their judge; else the
    Wikipedia eval split, with masked-NLL windows)."""
    if path is None and task is not None:
        return task_data(tokenizer, task, n, "eval")
    if path is not None:
        return PromptData(read_prompt_file(path, tokenizer, n, prompt_tokens), None, {"source": str(path)})
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: pass --prompts with prompts it can read")
    tokens = prompt_tokens or DEFAULT_PROMPT_TOKENS
    windows = wiki.text_windows(tokenizer, "eval", n, tokens + gen_length)
    description = {"source": "wikipedia leads, eval split", "prompt_tokens": tokens}
    return PromptData(wiki.prompt_ids(tokenizer, "eval", n, tokens), windows, description)
