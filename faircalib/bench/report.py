"""The benchmark's summaries: mean and spread over seeds, and the markdown table."""

from __future__ import annotations

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
