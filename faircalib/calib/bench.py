"""The calibration benchmark: every method x format x calibration seed on one model, parity on held-out
prompts, calibration wall time and peak memory. Writes results.json, results.md and one SVG of per-step
frontier flip curves per format.

Each calibration runs as its own `faircalib calibrate` process, so its wall time and peak resident
memory (the high-water mark the process records in its manifest) are its own. Calibration seed s uses
the s-th disjoint slice of the calibration split.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import FORMATS, METHODS
from faircalib.calib.evaluate import fake_quant_student, parity_report
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser, load_tokenizer
from faircalib.models.tokenizer import encode_prompt
from faircalib.sampling import LLaDASampling
from faircalib.sampling.metrics import PARITY_METRICS, masked_nll, teacher_post_commit_mismatch, teacher_runs
from faircalib.zoo import model_dir, wiki

METRICS = (*PARITY_METRICS, "masked_nll_q")


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
    gen_length: int = 32
    block_length: int = 8
    steps: int = 32
    # Committed positions probed per row and step for post_commit_mismatch (one: std about 0.007 at 64 prompts).
    post_commit_probes: int = 4
    out: str = "runs/bench"
    extra_flags: tuple[str, ...] = field(default_factory=tuple)
    # Re-measure parity on the artifacts of an earlier run in ``out``, keeping its calibration time and
    # memory (after a metric changes, without recalibrating).
    reuse_artifacts: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS] + [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"unknown methods/formats: {unknown}")
        if self.eval_windows_per_article < 1 or (self.n_nll_windows is not None and self.n_nll_windows < 1):
            raise ConfigError("eval_windows_per_article and n_nll_windows must be >= 1")
        if self.post_commit_probes < 1:
            raise ConfigError(f"post_commit_probes must be >= 1, got {self.post_commit_probes}")


def run_calibration_process(cmd: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, exit code) of one child process."""
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - start, code


def run_bench(cfg: BenchConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_denoiser(cfg.model)
    tokenizer = load_tokenizer(Path(cfg.model))
    sampling = LLaDASampling(gen_length=cfg.gen_length, block_length=cfg.block_length, steps=cfg.steps)
    eval_prompts = wiki.prompt_ids(
        tokenizer, "eval", cfg.n_eval_prompts, cfg.prompt_tokens, cfg.eval_windows_per_article
    )
    n_nll = cfg.n_eval_prompts if cfg.n_nll_windows is None else cfg.n_nll_windows
    nll_windows = wiki.text_windows(tokenizer, "eval", n_nll, cfg.prompt_tokens + cfg.gen_length)
    # Articles long enough for a full prompt, like the evaluation prompts; calibrate takes their openings.
    calib_texts = [
        text for _, text in wiki.load_articles("calib") if len(encode_prompt(tokenizer, text)) >= cfg.prompt_tokens
    ]
    references = teacher_runs(teacher, eval_prompts, sampling, teacher.spec)
    nll_fp = masked_nll(teacher, nll_windows, teacher.spec)
    teacher_post_commit = teacher_post_commit_mismatch(
        teacher, references, sampling, teacher.spec, probes=cfg.post_commit_probes
    )
    own = {"teacher": {"post_commit_mismatch": teacher_post_commit}}
    earlier = {}
    if cfg.reuse_artifacts and (out / "results.json").is_file():
        for row in json.loads((out / "results.json").read_text())["runs"]:
            earlier[(row["method"], row["format"], row["seed"])] = row
    rows = []
    for seed in cfg.seeds:
        prompts_file = out / f"calib_prompts_seed{seed}.txt"
        chunk = calib_texts[seed * cfg.n_calib_prompts : (seed + 1) * cfg.n_calib_prompts]
        if len(chunk) < cfg.n_calib_prompts:
            raise ConfigError(f"the calibration split has too few articles for seed {seed}")
        prompts_file.write_text("\n".join(chunk) + "\n")
        for fmt in cfg.formats:
            wbits, abits = FORMATS[fmt]
            for method in cfg.methods:
                name = f"{method}-{fmt}-seed{seed}"
                artifact = out / "artifacts" / name
                cmd = [
                    sys.executable, "-m", "faircalib", "calibrate", "--model", cfg.model, "--method", method,
                    "--wbits", str(wbits), "--abits", str(abits), "--seed", str(seed),
                    "--calib-prompts", str(prompts_file), "--n-prompts", str(cfg.n_calib_prompts),
                    "--prompt-tokens", str(cfg.prompt_tokens),
                    "--gen-length", str(cfg.gen_length), "--block-length", str(cfg.block_length),
                    "--steps", str(cfg.steps), "--out", str(artifact), "--quiet", *cfg.extra_flags,
                ]  # fmt: skip
                (out / "logs").mkdir(exist_ok=True)
                previous = earlier.get((method, fmt, seed))
                if previous is not None and "error" not in previous and (artifact / "manifest.json").is_file():
                    seconds, code = previous["calib_seconds"], 0
                else:
                    seconds, code = run_calibration_process(cmd, out / "logs" / f"{name}.log")
                row = {"method": method, "format": fmt, "seed": seed, "calib_seconds": seconds}
                if code != 0:
                    row["error"] = (out / "logs" / f"{name}.log").read_text().strip().splitlines()[-1]
                    print(f"{name}: calibration failed: {row['error']}", file=sys.stderr)
                else:
                    loaded = QuantArtifact.load(artifact)
                    # The child's own high-water mark: a child's rusage also counts the (large) parent it forked from.
                    row["peak_rss_mb"] = loaded.manifest["peak_memory_mb"]
                    student = fake_quant_student(teacher, loaded)
                    report = parity_report(
                        teacher, student, eval_prompts, sampling, nll_windows=nll_windows, references=references,
                        nll_fp=nll_fp, post_commit_probes=cfg.post_commit_probes,
                        teacher_post_commit=teacher_post_commit,
                    )  # fmt: skip
                    row.update({k: report[k] for k in METRICS}, masked_nll_fp=report["masked_nll_fp"])
                    row["flip_curve"] = report["curves"]["frontier_flip_rate"]
                    print(f"{name}: flips {row['frontier_flip_rate']:.4f}  {seconds:.0f}s", file=sys.stderr)
                rows.append(row)
                (out / "results.json").write_text(json.dumps({"config": asdict(cfg), **own, "runs": rows}, indent=1))
    summary = summarise(rows)
    (out / "results.md").write_text(markdown_table(summary, cfg, teacher_post_commit))
    for fmt in cfg.formats:
        (out / f"flip_curves_{fmt}.svg").write_text(flip_curve_svg(rows, fmt))
    return {"config": asdict(cfg), **own, "runs": rows, "summary": summary}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per (format, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["format"], row["method"]), []).append(row)
    summary = []
    for (fmt, method), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        entry = {"format": fmt, "method": method, "runs": len(ok), "failed": len(runs) - len(ok)}
        for key in (*METRICS, "calib_seconds", "peak_rss_mb"):
            values = [r[key] for r in ok if r.get(key) is not None]
            entry[key] = mean(values) if values else None
            entry[f"{key}_std"] = stdev(values) if len(values) > 1 else 0.0 if values else None
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], cfg: BenchConfig, teacher_post_commit: float | None = None) -> str:
    cols = (*METRICS, "calib_seconds", "peak_rss_mb")
    lines = [
        f"Model `{cfg.model}`; {cfg.n_eval_prompts} eval prompts of {cfg.prompt_tokens} tokens "
        f"(up to {cfg.eval_windows_per_article} per article); schedule gen "
        f"{cfg.gen_length} / block {cfg.block_length} / {cfg.steps} steps; seeds {list(cfg.seeds)} (mean +- std).",
    ]
    if teacher_post_commit is not None:
        lines.append(
            f"The full-precision teacher's own post_commit_mismatch on these prompts is {teacher_post_commit:.4f} "
            f"({cfg.post_commit_probes} probes per row and step): a student that decides exactly like the teacher "
            "scores this in both post-commit columns (the forced one asks every student the teacher's questions)."
        )
    lines += [
        "",
        "| format | method | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for entry in sorted(summary, key=lambda e: (e["format"], e["method"])):
        cells = []
        for key in cols:
            value, spread = entry.get(key), entry.get(f"{key}_std")
            if value is None:
                cells.append("failed" if entry["failed"] else "-")
            elif key in ("calib_seconds", "peak_rss_mb"):
                cells.append(f"{value:.0f} +- {spread:.0f}")
            else:
                cells.append(f"{value:.4f} +- {spread:.4f}")
        lines.append(f"| {entry['format']} | {entry['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flip_curve_svg(rows: list[dict], fmt: str, width: int = 640, height: int = 360) -> str:
    """Mean per-step frontier flip rate per method, as a dependency-free SVG line chart."""
    curves: dict[str, list[list[float | None]]] = {}
    for row in rows:
        if row["format"] == fmt and "flip_curve" in row:
            curves.setdefault(row["method"], []).append(row["flip_curve"])
    pad, colors = 48, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
    means = {}
    for method, runs in curves.items():
        steps = len(runs[0])
        means[method] = [mean(v) if (v := [r[i] for r in runs if r[i] is not None]) else math.nan for i in range(steps)]
    top = max([v for m in means.values() for v in m if not math.isnan(v)] + [1e-3])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle">frontier flip rate per step, {fmt}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="30" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{pad - 4}" y="34" text-anchor="end">{top:.2f}</text>',
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">0</text>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">denoising step</text>',
    ]
    for k, (method, values) in enumerate(sorted(means.items())):
        n = max(1, len(values) - 1)
        points = " ".join(
            f"{pad + i * (width - pad - 10) / n:.1f},{height - pad - v / top * (height - pad - 30):.1f}"
            for i, v in enumerate(values)
            if not math.isnan(v)
        )
        color = colors[k % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{width - 120}" y="{40 + 16 * k}" fill="{color}">{method}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
