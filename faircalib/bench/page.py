"""Pages a person reads instead of the JSON: ``report.html`` of one parity run (where decisions break: per step,
per position in the block, per block, by the teacher's lead) and of a benchmark (methods side by side, seed
spread as error bars). Figures are PNGs drawn by matplotlib beside the page; writes are atomic.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: pages are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from faircalib.files import write_text_atomic  # noqa: E402

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}
figcaption{{color:#555;margin-bottom:1.5em}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _figure(name: str, caption: str) -> str:
    text = html.escape(caption)
    return f'<figure><img src="{name}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _rates(flips: list[int], commits: list[int]) -> list[float]:
    return [f / c if c else math.nan for f, c in zip(flips, commits, strict=True)]


def step_figure(curves: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, values in curves.items():
        ax.plot([math.nan if v is None else v for v in values], label=name.replace("_", " "))
    ax.set(xlabel="denoising step", ylabel="rate", title="Per denoising step")
    ax.legend(fontsize=8)
    return _save(fig, out, "steps.png")


def position_figure(breakdown: dict, block_length: int, out: Path) -> str:
    """Flip rate by position within the block and by block, from counts by generated position."""
    flips, commits = breakdown["flips_at"], breakdown["commits_at"]
    blocks = max(1, len(flips) // block_length)
    within = [[sum(x[i::block_length]) for i in range(block_length)] for x in (flips, commits)]
    per_block = [[sum(x[b * block_length : (b + 1) * block_length]) for b in range(blocks)] for x in (flips, commits)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.bar(range(block_length), _rates(*within), color="#c44")
    left.set(xlabel="position within the block", ylabel="frontier flip rate", title="By position in the block")
    right.bar(range(blocks), _rates(*per_block), color="#48c")
    right.set(xlabel="block", ylabel="frontier flip rate", title="By block", xticks=range(blocks))
    return _save(fig, out, "positions.png")


def lead_figure(breakdown: dict, out: Path) -> str:
    """The teacher's commit leads, every commit and the flipped ones."""
    edges, commits, flips = breakdown["lead_bins"], breakdown["lead_commits"], breakdown["lead_flips"]
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar(edges, commits, width=width, align="edge", color="#bbb", label="teacher's commits")
    ax.bar(edges, flips, width=width, align="edge", color="#c44", label="flipped by the student")
    ax.set_yscale("symlog", linthresh=1)
    ax.set(xlabel="teacher's lead: top-1 minus runner-up logit (nats; last bin open)", ylabel="decisions",
           title="Which decisions flip")  # fmt: skip
    ax.legend(fontsize=8)
    return _save(fig, out, "leads.png")


def layer_figure(promotion: dict, out: Path) -> str:
    """Each quantized linear's score from the calibration's promotion, block by block, the promoted ones in red."""
    keys = list(promotion["scores"])
    promoted = set(promotion["promoted"])
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * len(keys)), 3.6))
    ax.bar(range(len(keys)), [promotion["scores"][k] for k in keys],
           color=["#c44" if k in promoted else "#48c" for k in keys])  # fmt: skip
    ticks = [i for i, k in enumerate(keys) if i == 0 or k.split(".")[1] != keys[i - 1].split(".")[1]]
    ax.set_xticks(ticks, [f"block {keys[i].split('.')[1]}" for i in ticks], rotation=90, fontsize=7)
    unit = "margin error (logits) its low bits add" if promotion["by"] == "flips" else "Hessian-trace sensitivity"
    ax.set(ylabel=unit, title=f"Per linear ({promotion['by']}; red: kept at 8 bits within {promotion['budget']:g} %)")
    return _save(fig, out, "layers.png")


def parity_page(report: dict, out: Path, block_length: int) -> Path:
    """``out/report.html`` and its figures for one ``parity`` report (its JSON form)."""
    out.mkdir(parents=True, exist_ok=True)
    scalars = [[k, f"{v:.4f}" if isinstance(v, float) else str(v)] for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    who = ", ".join(f"{k} {report[k]}" for k in ("method", "format", "backend", "artifact") if k in report)
    body = [f"<p>{html.escape(who)}; {report.get('prompts')} prompts, {report.get('teacher_commits')} of the "
            "teacher's committed decisions.</p>", _table(["metric", "value"], scalars)]  # fmt: skip
    body.append(_figure(step_figure(report["curves"], out), "Rates per denoising step along the teacher's "
                        "trajectory: flips, commit-set disagreement, write error, post-commit mismatch."))  # fmt: skip
    breakdown = report["breakdown"]
    body.append(_figure(position_figure(breakdown, block_length, out), "Where in the sequence decisions flip: "
                        "the rate of flipped commits at each position within a block and in each block."))  # fmt: skip
    body.append(_figure(lead_figure(breakdown, out), "How firmly the teacher decided where the student flipped: "
                        "commits by the teacher's logit lead, flipped ones in red."))  # fmt: skip
    if "promotion" in report:
        body.append(
            _figure(
                layer_figure(report["promotion"], out),
                "Where in the network decisions break: each "
                "quantized linear's score at calibration, in block order; red ones were kept at 8 bits.",
            )
        )
    else:
        body.append("<p>Per-linear sensitivity: calibrate with --promote-budget to score every linear.</p>")
    path = out / "report.html"
    write_text_atomic(path, PAGE.format(title="faircalib parity report", body="\n".join(body)))
    return path


def bench_page(rows: list[dict], summary: list[dict], cfg, out: Path) -> Path:
    """``out/report.html`` comparing methods per format: bars with seed spread, mean flip curves."""
    out.mkdir(parents=True, exist_ok=True)
    body = [f"<p>Model <code>{html.escape(str(cfg.model))}</code>; {cfg.n_eval_prompts} evaluation prompts; seeds "
            f"{list(cfg.seeds)}; bars are means, error bars one standard deviation over seeds.</p>"]  # fmt: skip
    for fmt in sorted({e["format"] for e in summary}):
        entries = sorted((e for e in summary if e["format"] == fmt and e["runs"]), key=lambda e: e["method"])
        metrics = [m for m in ("frontier_flip_rate", "frontier_write_error", "task_accuracy")
                   if any(e.get(m) is not None for e in entries)]  # fmt: skip
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            names = [e["method"] for e in entries]
            ax.bar(names, [e.get(metric) or 0 for e in entries], yerr=[e.get(f"{metric}_std") or 0 for e in entries],
                   color="#48c", capsize=3)  # fmt: skip
            ax.set_title(metric.replace("_", " "))
            ax.tick_params(axis="x", rotation=45, labelsize=8)
        bars = _save(fig, out, f"methods_{fmt}.png")
        fig, ax = plt.subplots(figsize=(8, 3.4))
        for method in [e["method"] for e in entries]:
            curves = [
                r["flip_curve"] for r in rows if r["format"] == fmt and r["method"] == method and "flip_curve" in r
            ]
            steps = range(len(curves[0])) if curves else []
            ax.plot(steps, [sum(c[i] or 0 for c in curves) / len(curves) for i in steps], label=method)
        ax.set(xlabel="denoising step", ylabel="frontier flip rate", title=f"{fmt}: flips per step (mean of seeds)")
        ax.legend(fontsize=8)
        curves_png = _save(fig, out, f"curves_{fmt}.png")
        table = [[e["method"], *(f"{e[m]:.4f} ± {e[m + '_std']:.4f}" if e.get(m) is not None else "-" for m in metrics),
                  f"{e['calib_seconds']:.0f}" if e.get("calib_seconds") is not None else "-"]
                 for e in entries]  # fmt: skip
        body += [f"<h2>{fmt}</h2>", _table(["method", *metrics, "calibration (s)"], table),
                 _figure(bars, f"{fmt}: each method's mean over seeds, with the seed spread."),
                 _figure(curves_png, f"{fmt}: frontier flips per denoising step.")]  # fmt: skip
    path = out / "report.html"
    write_text_atomic(path, PAGE.format(title="faircalib benchmark", body="\n".join(body)))
    return path
