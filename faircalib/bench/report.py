"""The benchmark's summaries: mean and spread over seeds, the markdown table, per-step flip curves as SVG."""

from __future__ import annotations

import math
from statistics import mean, stdev

from faircalib.sampling.metrics import PARITY_METRICS

METRICS = (*PARITY_METRICS, "post_commit_forced_distance", "masked_nll_q", "task_accuracy")


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


def markdown_table(summary: list[dict], cfg, teacher_post_commit: float | None = None) -> str:
    """The summary as a markdown table with the setting it was measured in (``cfg``, a BenchConfig)."""
    cols = (*METRICS, "calib_seconds", "peak_rss_mb")
    lines = [
        f"Model `{cfg.model}`; {cfg.n_eval_prompts} eval prompts of {cfg.prompt_tokens} tokens "
        f"(up to {cfg.eval_windows_per_article} per article); schedule gen "
        f"{cfg.sampling().gen_length} / block {cfg.sampling().block_length} / {cfg.sampling().steps} steps; "
        f"seeds {list(cfg.seeds)} (mean +- std).",
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
