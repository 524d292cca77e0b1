"""lm-evaluation-harness sees a faircalib denoiser, the teacher or any student backend, as a model.

``generate_until`` decodes through faircalib's samplers under the schedule given (a task's ``gen_kwargs`` may
set ``gen_length``, ``block_length``, ``steps``, ``remasking``); ``loglikelihood`` is LLaDA's own Monte Carlo
estimate: the continuation masked at ``mc_num`` stratified ratios, the masked tokens' negative log-likelihood
divided by the ratio, averaged. Tasks come from local files (lm-eval YAML with its data beside it), so nothing is
fetched; a bundled task model's own benchmark is the task ``mini_sudoku``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.models.tokenizer import encode_prompt
from faircalib.sampling import Denoise, Sampling, generate, shift_logits
from faircalib.zoo import tasks

SCHEDULE_KEYS = ("gen_length", "block_length", "steps", "remasking", "alg")
HELD_OUT = 500  # mini_sudoku's problems when no --limit is given


class DenoiserLM(LM):
    """A denoiser (any ``backend(ids) -> logits``) with its tokenizer and default schedule, as an lm-eval model."""

    def __init__(self, denoise: Denoise, spec: DenoiserSpec, tokenizer, sampling: Sampling, *, device="cpu",
                 mc_num: int = 32, seed: int = 0, batch_size: int = 16):  # fmt: skip
        super().__init__()
        self.denoise, self.spec, self.tokenizer, self.sampling = denoise, spec, tokenizer, sampling
        self.where, self.mc_num, self.seed, self.batch = device, mc_num, seed, batch_size

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context decoded under the default schedule (or the one its gen_kwargs set), cut at its stops."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            schedule = tuple((k, gen_kwargs[k]) for k in SCHEDULE_KEYS if k in gen_kwargs)
            groups.setdefault((schedule, len(encode_prompt(self.tokenizer, context))), []).append(i)
        for (schedule, _), members in groups.items():
            sampling = dataclasses.replace(self.sampling, **dict(schedule))
            for start in range(0, len(members), self.batch):
                batch = members[start : start + self.batch]
                ids = torch.tensor([encode_prompt(self.tokenizer, requests[i].args[0]) for i in batch])
                written = generate(self.denoise, ids.to(self.where), sampling, self.spec).generated
                for i, text in zip(batch, self.tokenizer.batch_decode(written, skip_special_tokens=True), strict=True):
                    out[i] = cut(text, requests[i].args[1].get("until", []))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(self.masked_loglikelihood(*request.args), False) for request in requests]

    @torch.no_grad()
    def masked_loglikelihood(self, context: str, continuation: str) -> float:
        """LLaDA's Monte Carlo estimate of log p(continuation | context)."""
        prefix = encode_prompt(self.tokenizer, context) if context else []
        target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        sequence = torch.tensor(prefix + target, device=self.where)
        n, generator = len(target), torch.Generator().manual_seed(self.seed)
        total = 0.0
        for start in range(0, self.mc_num, self.batch):
            rows = min(self.batch, self.mc_num - start)
            # stratified numbers of masked tokens, 1 to n, in a random order along the continuation
            counts = (torch.arange(start, start + rows) + torch.rand(1, generator=generator)) % self.mc_num
            counts = (counts / self.mc_num * n).floor().long() + 1
            order = torch.rand(rows, n, generator=generator).argsort(dim=1)
            masked = torch.zeros(rows, len(sequence), dtype=torch.bool)
            masked[:, len(prefix) :] = order < counts[:, None]
            masked = masked.to(self.where)
            ids = torch.where(masked, self.spec.mask_token_id, sequence.expand(rows, -1))
            logits = self.denoise(ids).to(self.where).float()
            logits = shift_logits(logits) if self.spec.logit_shift else logits
            nll = F.cross_entropy(logits[masked], sequence.expand(rows, -1)[masked], reduction="none")
            ratio = (counts.float() / n).to(self.where)[:, None].expand_as(masked)[masked]
            total += float((nll / ratio).sum())
        return -total / self.mc_num

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("faircalib's denoisers score continuations of a context (loglikelihood), not texts")


def cut(text: str, until: str | Sequence[str]) -> str:
    """``text`` up to its first stop string."""
    for stop in [until] if isinstance(until, str) else until:
        if stop:
            text = text.split(stop)[0]
    return text


def mini_sudoku_task(n: int, unseen: list[int]) -> dict[str, Any]:
    """The bundled task model's benchmark as an lm-eval task: ``n`` held-out problems, judged by the verifier."""
    import datasets

    problems = tasks.held_out_problems(n, unseen)

    def dataset(**_kwargs):
        rows = [{"prompt": p.prompt, "answer": p.answer, "index": i} for i, p in enumerate(problems)]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        return {"acc": float(tasks.verify(problems[doc["index"]], results[0]))}

    return {
        "task": "mini_sudoku", "custom_dataset": dataset, "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "prompt", "doc_to_target": "answer", "target_delimiter": "",
        "generation_kwargs": {"until": []}, "process_results": process_results,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip


def task_specs(names: Sequence[str], task: dict[str, Any] | None, limit: int | None) -> list[str | dict]:
    """lm-eval task specs for ``names``: ``mini_sudoku`` (a task model's ``limit`` held-out problems, by default
    ``HELD_OUT``) as an inline task, anything else (a task name or a YAML path) as given."""
    specs: list[str | dict] = []
    for name in names:
        if name != tasks.TASK:
            specs.append(name)
        elif task is None:
            raise ConfigError(f"{tasks.TASK} is a task model's benchmark: give --model a model with a task.json")
        else:
            specs.append(mini_sudoku_task(limit or HELD_OUT, task["held_out_unseen"]))
    return specs


def evaluate(lm: DenoiserLM, specs: Sequence[str | dict], include_path=None, limit: int | None = None) -> dict:
    """lm-eval's evaluation of ``lm`` on local tasks (names under ``include_path``, YAML paths, or task dicts),
    without scanning lm-eval's built-in tasks, so nothing is fetched."""
    from lm_eval.evaluator import evaluate as run
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path or []] or None, include_defaults=False)
    try:
        loaded = manager.load(list(specs))
    except KeyError as err:
        raise ConfigError(f"{err.args[0]} (tasks are found under --include-path)") from None
    return run(lm, loaded, limit=limit, bootstrap_iters=0, log_samples=True)


def summary(results: dict) -> dict[str, Any]:
    """Each task's metrics and number of examples, and per example its response and metrics (JSON-ready)."""
    out: dict[str, Any] = {"results": {}, "samples": {}}
    for task, metrics in results["results"].items():
        scores = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith("stderr")}
        out["results"][task] = {**scores, "examples": results["n-samples"][task]["effective"]}
        out["samples"][task] = [
            {"doc_id": s["doc_id"], "response": s["filtered_resps"], "target": s["target"],
             **{k: s[k] for k in scores if k in s}}
            for s in results["samples"][task]
        ]  # fmt: skip
    return out
