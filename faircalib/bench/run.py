"""Every method x format x calibration seed on one model: parity on held-out prompts, calibration wall time
and peak memory. Writes results.json, results.md and report.html (methods side by side, per-step flip curves).

Each calibration runs in a process of its own, so its wall time and peak resident memory (the high-water
mark it records in its manifest) are its own. Calibration seed s uses the s-th disjoint slice of the
calibration split.
"""

from __future__ import annotations

import copy
import itertools
import json
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from faircalib.bench.page import bench_page
from faircalib.bench.report import METRICS, markdown_table, summarise
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import FORMATS, METHODS, QuantConfig, preset
from faircalib.data import PromptData, calibration_data, self_written_data, task_data, task_of
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser, load_tokenizer
from faircalib.models.tokenizer import encode_prompt
from faircalib.sampling import LLaDASampling, record_runs
from faircalib.sampling.metrics import masked_nll
from faircalib.sampling.parity import parity_report, teacher_post_commit_mismatch
from faircalib.zoo import model_dir, wiki


@dataclass(frozen=True)
class BenchConfig:
    model: str = str(model_dir())
    methods: tuple[str, ...] = ("rtn", "gptq", "gptq-text", "smoothquant", "quarot", "gptq-recon", "fair")
    formats: tuple[str, ...] = ("W4A4", "W4A8", "W4A16")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_calib_prompts: int = 32
    n_eval_prompts: int = 64
    # Past the 507 openings of the evaluation split, later disjoint windows of its articles (zoo.wiki.prompt_ids).
    eval_windows_per_article: int = 1
    n_nll_windows: int | None = None  # masked-NLL windows (prompt + generation long); None: n_eval_prompts
    prompt_tokens: int = 16
    gen_length: int | None = None  # None: the model's task schedule, else 32
    block_length: int | None = None  # None: as gen_length's default, else 8
    steps: int | None = None  # None: as gen_length's default, else 32
    post_commit_probes: int = 4  # committed positions probed per row and step for the post-commit metrics
    out: str = "runs/bench"
    overrides: tuple[str, ...] = ()  # QuantConfig fields as FIELD=VALUE (JSON values), for every run
    # Re-measure parity on the artifacts of an earlier run in ``out``, keeping its calibration time and
    # memory (after a metric changes, without recalibrating).
    reuse_artifacts: bool = False
    calib_source: Literal["dataset", "self"] = "dataset"  # "self": prompts the teacher writes itself

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS] + [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"unknown methods/formats: {', '.join(unknown)}")
        if self.eval_windows_per_article < 1 or (self.n_nll_windows is not None and self.n_nll_windows < 1):
            raise ConfigError("eval_windows_per_article and n_nll_windows must be >= 1")
        if self.calib_source not in ("dataset", "self"):
            raise ConfigError(f"calib_source is dataset or self, got {self.calib_source}")
        if self.post_commit_probes < 1:
            raise ConfigError(f"post_commit_probes must be >= 1, got {self.post_commit_probes}")
        parse_overrides(self.overrides)

    def sampling(self) -> LLaDASampling:
        """The schedule given, else a task model's own (its task.json), else gen 32 / blocks of 8 / 32 steps."""
        task = task_of(Path(self.model)) or {}
        lengths = {**dict(gen_length=32, block_length=8, steps=32), **task.get("sampling", {})}
        given = {k: getattr(self, k) for k in ("gen_length", "block_length", "steps") if getattr(self, k) is not None}
        return LLaDASampling(**{**lengths, **given})


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """FIELD=VALUE pairs (VALUE as JSON, else a string) checked against QuantConfig's fields."""
    fields = QuantConfig.__dataclass_fields__
    values = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields or name == "method":
            raise ConfigError(f"an override is FIELD=VALUE with a QuantConfig field other than method; got {pair}")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return values


def _calibrate_child(log: str, model: str, cfg: QuantConfig, sampling, data: PromptData, out: str) -> None:
    """One calibration, in a process of its own, its output in ``log``."""
    from faircalib.api import calibrate_to

    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            calibrate_to(out, load_denoiser(model), cfg, data.prompts, sampling, text_windows=data.text_windows,
                         data_description=data.description, overwrite=True)  # fmt: skip
        except BaseException as err:
            traceback.print_exc()
            print(f"{type(err).__name__}: {err}", flush=True)
            os._exit(1)


def calibrate_in_process(cfg: BenchConfig, qcfg: QuantConfig, data: PromptData, out: Path, log: Path) -> float:
    """Wall seconds of one calibration in a fresh process; raises ConfigError with its last line on failure."""
    start = time.perf_counter()
    data = replace(data, judge=None)  # calibration never judges answers, and a judge does not pickle
    child = multiprocessing.get_context("spawn").Process(
        target=_calibrate_child, args=(str(log), cfg.model, qcfg, cfg.sampling(), data, str(out))
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        lines = log.read_text().strip().splitlines() if log.is_file() else []
        raise ConfigError(lines[-1] if lines else f"exit code {child.exitcode}")
    return time.perf_counter() - start


@dataclass
class Evaluation:
    """The teacher's side of every comparison, computed once."""

    teacher: Any
    prompts: list[list[int]]
    references: list
    nll_windows: Any
    nll_fp: float | None
    post_commit: float
    judge: Any = None  # a task model's verifier of answers


def evaluation(cfg: BenchConfig) -> Evaluation:
    """The held-out prompts (a task model's problems, or the Wikipedia eval split with masked-NLL windows) and
    the teacher's runs on them."""
    teacher = load_denoiser(cfg.model)
    tokenizer = load_tokenizer(Path(cfg.model))
    task, judge = task_of(Path(cfg.model)), None
    if task is not None:
        data = task_data(tokenizer, task, cfg.n_eval_prompts, "eval")
        prompts, judge, windows = data.prompts, data.judge, data.text_windows  # windows: the solved problems
    else:
        prompts = wiki.prompt_ids(tokenizer, "eval", cfg.n_eval_prompts, cfg.prompt_tokens,
                                  cfg.eval_windows_per_article)  # fmt: skip
        n_nll = cfg.n_eval_prompts if cfg.n_nll_windows is None else cfg.n_nll_windows
        windows = wiki.text_windows(tokenizer, "eval", n_nll, cfg.prompt_tokens + cfg.sampling().gen_length)
    nll_fp = masked_nll(teacher, windows, teacher.spec)
    references = record_runs(teacher, prompts, cfg.sampling(), teacher.spec)
    post_commit = teacher_post_commit_mismatch(teacher, references, cfg.sampling(), teacher.spec,
                                               cfg.post_commit_probes)  # fmt: skip
    return Evaluation(teacher, prompts, references, windows, nll_fp, post_commit, judge)


def measure(cfg: BenchConfig, ev: Evaluation, artifact_dir: Path) -> dict:
    """The parity row of one calibrated artifact."""
    loaded = QuantArtifact.load(artifact_dir)
    student = loaded.apply(copy.deepcopy(ev.teacher))
    report = parity_report(
        ev.teacher, student, ev.prompts, cfg.sampling(), ev.teacher.spec, references=ev.references,
        nll_windows=ev.nll_windows, nll_fp=ev.nll_fp, teacher_post_commit=ev.post_commit,
        post_commit_probes=cfg.post_commit_probes, judge=ev.judge,
    )  # fmt: skip
    row = {k: report.get(k) for k in (*METRICS, "task_accuracy_teacher")}
    # the child's own high-water mark: a child's rusage also counts the (large) parent it came from
    row.update(masked_nll_fp=report.get("masked_nll_fp"), peak_rss_mb=loaded.manifest["peak_memory_mb"])
    row["flip_curve"] = report["curves"]["frontier_flip_rate"]
    return row


def seed_data(cfg: BenchConfig, ev: Evaluation, seed: int, texts: list[str], text: bool) -> PromptData:
    """Calibration seed ``seed``'s slice of the calibration split (a task model's calibration problems, or
    Wikipedia articles, written down beside the results), or what the teacher writes with that seed."""
    if cfg.calib_source == "self":  # prompts as long as the evaluation's (a task model's problems)
        tokens = len(ev.prompts[0]) if ev.judge is not None else cfg.prompt_tokens
        return self_written_data(ev.teacher, cfg.n_calib_prompts, tokens, cfg.sampling().gen_length, seed)
    tokenizer = load_tokenizer(Path(cfg.model))
    task = task_of(Path(cfg.model))
    if task is not None:
        return task_data(tokenizer, task, cfg.n_calib_prompts, "calib", offset=seed * cfg.n_calib_prompts)
    chunk = texts[seed * cfg.n_calib_prompts : (seed + 1) * cfg.n_calib_prompts]
    if len(chunk) < cfg.n_calib_prompts:
        raise ConfigError(f"the calibration split has too few articles for seed {seed}")
    path = Path(cfg.out) / f"calib_prompts_seed{seed}.txt"
    path.write_text("\n".join(chunk) + "\n")
    return calibration_data(tokenizer, cfg.n_calib_prompts, cfg.prompt_tokens, cfg.sampling().gen_length, path, text)


def run_bench(cfg: BenchConfig, ev: Evaluation | None = None) -> dict:
    """Every run of ``cfg``; ``ev``: the evaluation of an earlier bench of the same model and prompts (the
    teacher's runs are the costly part of a small bench)."""
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ev = ev if ev is not None else evaluation(cfg)
    tokenizer = load_tokenizer(Path(cfg.model))
    # articles long enough for a full prompt, like the evaluation prompts
    texts = [t for _, t in wiki.load_articles("calib") if len(encode_prompt(tokenizer, t)) >= cfg.prompt_tokens]
    earlier = {}
    if cfg.reuse_artifacts and (out / "results.json").is_file():
        runs = json.loads((out / "results.json").read_text())["runs"]
        earlier = {(r["method"], r["format"], r["seed"]): r for r in runs}
    own, rows = {"teacher": {"post_commit_mismatch": ev.post_commit}}, []
    for seed, fmt, method in itertools.product(cfg.seeds, cfg.formats, cfg.methods):
        rows.append(bench_one(cfg, ev, method, fmt, seed, texts, earlier.get((method, fmt, seed))))
        (out / "results.json").write_text(json.dumps({"config": asdict(cfg), **own, "runs": rows}, indent=1))
    summary = summarise(rows)
    (out / "results.md").write_text(markdown_table(summary, cfg, ev.post_commit))
    bench_page(rows, summary, cfg, out)
    return {"config": asdict(cfg), **own, "runs": rows, "summary": summary}


def bench_one(cfg: BenchConfig, ev: Evaluation, method: str, fmt: str, seed: int, texts, previous) -> dict:
    """Calibrate (unless an earlier run's artifact is reused) and measure one method, format and seed."""
    wbits, abits = FORMATS[fmt]
    name = f"{method}-{fmt}-seed{seed}"
    artifact = Path(cfg.out) / "artifacts" / name
    row = {"method": method, "format": fmt, "seed": seed}
    try:
        qcfg = preset(method, wbits=wbits, abits=abits, seed=seed, n_prompts=cfg.n_calib_prompts,
                      **parse_overrides(cfg.overrides))  # fmt: skip
        if previous is not None and "error" not in previous and (artifact / "manifest.json").is_file():
            row["calib_seconds"] = previous["calib_seconds"]
        else:
            data = seed_data(cfg, ev, seed, texts, qcfg.states == "text")
            log = Path(cfg.out) / "logs" / f"{name}.log"
            row["calib_seconds"] = calibrate_in_process(cfg, qcfg, data, artifact, log)
    except ConfigError as err:
        row["error"] = str(err)
        print(f"{name}: calibration failed: {err}", file=sys.stderr)
        return row
    row.update(measure(cfg, ev, artifact))
    print(f"{name}: flips {row['frontier_flip_rate']:.4f}  {row['calib_seconds']:.0f}s", file=sys.stderr)
    return row
