"""Mixed precision's trade-off: frontier flips and task accuracy against weight size, for flip-aware promotion
and for HAWQ's Hessian-trace sensitivity at the same budgets, over calibration seeds.

    python benchmarks/promotion.py --model faircalib/zoo/llada-sudoku-tiny --method gptq --budgets 5 10 20 \
        --n-eval-prompts 500 --out runs/promotion-sudoku

Runs one ``faircalib bench`` (W4A4) per criterion and budget in OUT/<criterion>-<budget>/ and the all-4-bit
student once in OUT/none-0/ (an interrupted run measures only what is missing), then writes OUT/tradeoff.json,
tradeoff.md and tradeoff.png: each point's mean weight bits over the quantized linears, and the mean and
sample spread of its rates over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from faircalib.bench.run import BenchConfig, evaluation, run_bench  # noqa: E402

RATES = ("frontier_flip_rate", "task_accuracy", "frontier_write_error")


def mean_bits(artifact: Path) -> float:
    """Weight bits per weight over the artifact's quantized linears."""
    layers = json.loads((artifact / "manifest.json").read_text())["layers"]
    sizes = {key: entry["shape"][0] * entry["shape"][1] for key, entry in layers.items()}
    return sum(layers[key]["wbits"] * n for key, n in sizes.items()) / sum(sizes.values())


def bench_config(args, out: Path, overrides: tuple[str, ...] = ()) -> BenchConfig:
    # one post-commit probe and few masked-NLL windows: flips and accuracy are what this curve draws
    return BenchConfig(model=args.model, methods=(args.method,), formats=("W4A4",), seeds=tuple(args.seeds),
                       n_eval_prompts=args.n_eval_prompts, n_nll_windows=16, post_commit_probes=1, out=str(out),
                       overrides=overrides, reuse_artifacts=True)  # fmt: skip


def point(out: Path, by: str, budget: float, args, ev) -> dict:
    overrides = (f"promote_budget={budget}", f"promote_by={by}", f"promote_states={args.states}") if budget else ()
    runs = [r for r in run_bench(bench_config(args, out, overrides), ev)["runs"] if "error" not in r]
    bits = [mean_bits(out / "artifacts" / f"{args.method}-W4A4-seed{r['seed']}") for r in runs]
    row = {"by": by, "budget": budget, "mean_bits": statistics.fmean(bits), "seeds": len(runs)}
    for rate in RATES:
        values = [r[rate] for r in runs if r.get(rate) is not None]
        if values:
            row[rate] = statistics.fmean(values)
            row[rate + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def table(rows: list[dict]) -> str:
    lines = ["| promoted by | budget (%) | mean weight bits | " + " | ".join(RATES) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in RATES) + " |"]  # fmt: skip
    for row in rows:
        cells = [f"{row[r]:.4f} +- {row[r + '_std']:.4f}" if r in row else "-" for r in RATES]
        lines.append(f"| {row['by']} | {row['budget']:g} | {row['mean_bits']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path, title: str) -> None:
    shown = [r for r in ("frontier_flip_rate", "task_accuracy") if any(r in row for row in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), squeeze=False)
    base = [row for row in rows if row["budget"] == 0]
    for ax, rate in zip(axes[0], shown, strict=True):
        for by, colour in (("flips", "tab:red"), ("hessian", "tab:blue")):
            mine = sorted(base + [row for row in rows if row["by"] == by], key=lambda row: row["mean_bits"])
            ax.errorbar([r["mean_bits"] for r in mine], [r[rate] for r in mine], [r[rate + "_std"] for r in mine],
                        marker="o", capsize=3, color=colour, label=f"promoted by {by}")  # fmt: skip
        ax.set_xlabel("mean weight bits of the quantized linears")
        ax.set_ylabel(rate.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--by", nargs="+", default=["flips", "hessian"], choices=["flips", "hessian"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--states", type=int, default=64, help="calibration states the linears are scored on")
    parser.add_argument("--n-eval-prompts", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ev = evaluation(bench_config(args, args.out))  # the teacher's runs, once for every point
    rows = [point(args.out / "none-0", "none", 0.0, args, ev)]
    for by in args.by:
        for budget in args.budgets:
            rows.append(point(args.out / f"{by}-{budget:g}", by, budget, args, ev))
            (args.out / "tradeoff.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                "rows": rows}, indent=1))  # fmt: skip
    (args.out / "tradeoff.md").write_text(table(rows))
    figure(rows, args.out / "tradeoff.png", f"{Path(args.model).name}, {args.method} W4A4, {len(args.seeds)} seeds")
    print(table(rows))


if __name__ == "__main__":
    main()
