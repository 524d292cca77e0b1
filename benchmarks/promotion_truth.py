"""Does a promotion criterion pick the linears whose promotion helps on held-out prompts? Each criterion's
per-linear scores (on a calibration seed's states, as calibration computes them) against the truth.

    python benchmarks/promotion_truth.py --model faircalib/zoo/llada-wiki-tiny \
        --artifacts runs/promotion-wiki-gptq/none-0/artifacts --n-eval-prompts 128 --out runs/promotion-truth-wiki

The truth, per seed and linear: on the seed's all-4-bit student (ARTIFACTS/<method>-W4A4-seed<s>, e.g. from
benchmarks/promotion.py's none-0 point), along the teacher's trajectories of the held-out prompts (every
``--every``-th step), how many frontier flips and how much frontier margin error promoting that linear
alone to 8 bits removes (parity's definitions). The criteria: ``flips`` and ``hessian`` (calib/promotion.py)
and ``counted``, the flips at the same masked positions counted instead of the margin error, for comparison.
Written: OUT/truth.json and OUT/truth.md with, per criterion and seed, the rank correlation of score per bit
with truth per bit and the truth its picks at each budget remove (single-linear effects summed).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from faircalib.bench.run import BenchConfig, evaluation, seed_data
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import preset
from faircalib.calib.linear import QuantLinear
from faircalib.calib.probe import teacher_states
from faircalib.calib.promotion import (
    choose_promoted,
    flip_scores,
    hessian_scores,
    low_bit_layer,
    low_bit_student,
    margin_error,
    masked_decisions,
    pick_rows,
    promoted_specs,
    promotion_gains,
)
from faircalib.calib.student import layer_key, linear_names
from faircalib.models.tokenizer import encode_prompt, load_tokenizer
from faircalib.sampling import record_runs
from faircalib.zoo import wiki


def frontier_rows(runs, every: int) -> list[tuple[torch.Tensor, ...]]:
    """Per recorded step: tokens [B, L], the teacher's commits [B, L], and there its two best tokens [N, 2] and
    their logit gap [N]."""
    rows = []
    for _, run in runs:
        for r in run.trajectory.steps[::every]:
            best = torch.stack((r.top1, r.top2), -1)
            rows.append((r.tokens, r.committed, best[r.committed], r.logit_gap.float()[r.committed]))
    return rows


def flips_and_margin(logits: torch.Tensor, best: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """[decisions the logits [N, V] take against the teacher's best token, their margin error]."""
    flips = float((logits.argmax(-1) != best[:, 0]).sum())
    return torch.tensor([flips, margin_error(logits, best, gap)], dtype=torch.float64)


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(x).argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def seed_truth(args, cfg: BenchConfig, ev, seed: int, texts: list[str]) -> dict:
    teacher, spec, sampling = ev.teacher, ev.teacher.spec, cfg.sampling()
    if spec.logit_shift:
        raise SystemExit("this benchmark reads decisions at their own positions: LLaDA-layout models only")
    qcfg = preset(args.method, wbits=4, abits=4, seed=seed, n_prompts=cfg.n_calib_prompts, promote_budget=10)
    linears = {layer_key(i, n): b.get_submodule(n) for i, b in enumerate(teacher.blocks) for n in linear_names(teacher)}
    specs = promoted_specs(qcfg.weight_spec(), replace(qcfg.act_spec(), static_amax=None))

    def promoted_layer(key: str) -> QuantLinear:
        return QuantLinear(low_bit_layer(linears[key], *specs), linears[key].bias, teacher.dtype)

    runs = record_runs(teacher, seed_data(cfg, ev, seed, texts, False).prompts, sampling, spec)
    calib = teacher_states([run for _, run in runs], qcfg, sampling, spec.mask_token_id)
    rows = pick_rows([chunk.tokens for chunk in calib.chunks], args.states)
    scores = {"flips": flip_scores(teacher, rows, qcfg), "hessian": hessian_scores(teacher, rows, qcfg)}
    states = masked_decisions(teacher, rows)
    with low_bit_student(teacher, qcfg):
        counted = promotion_gains(teacher, states, list(linears), promoted_layer, flips_and_margin)
    scores["counted"] = {key: float(gain[0]) for key, gain in counted.items()}
    student = QuantArtifact.load(args.artifacts / f"{args.method}-W4A4-seed{seed}").apply(copy.deepcopy(teacher))
    rows = frontier_rows(ev.references, args.every)
    truth = promotion_gains(student, rows, list(linears), promoted_layer, flips_and_margin)
    truth = {key: gain.tolist() for key, gain in truth.items()}
    return {"scores": scores, "truth": truth, "sizes": {k: lin.weight.numel() for k, lin in linears.items()}}


def table(results: dict, budgets: list[float]) -> str:
    head = "| criterion | seed | rank corr. with flips removed | rank corr. with margin error removed | "
    head += " | ".join(f"flips / margin error removed at {b:g} %" for b in budgets) + " |"
    lines = [head, "|" + " --- |" * (4 + len(budgets))]
    for seed, r in results.items():
        truth, sizes = r["truth"], r["sizes"]
        for name, scores in r["scores"].items():
            per_bit = [scores[k] / sizes[k] for k in truth]
            corr = [spearman(per_bit, [truth[k][i] / sizes[k] for k in truth]) for i in (0, 1)]
            cells = []
            for budget in budgets:
                picks = choose_promoted(scores, sizes, budget, 4)
                cells.append(f"{sum(truth[k][0] for k in picks):.0f} / {sum(truth[k][1] for k in picks):.0f}")
            lines.append(f"| {name} | {seed} | {corr[0]:+.2f} | {corr[1]:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--states", type=int, default=64, help="calibration states the linears are scored on")
    parser.add_argument("--n-eval-prompts", type=int, default=128)
    parser.add_argument("--every", type=int, default=2, help="truth on every EVERY-th step of the held-out runs")
    parser.add_argument("--budgets", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(model=args.model, n_eval_prompts=args.n_eval_prompts, n_nll_windows=4, post_commit_probes=1,
                      out=str(args.out))  # fmt: skip
    ev = evaluation(cfg)
    tokenizer = load_tokenizer(Path(args.model))
    texts = [t for _, t in wiki.load_articles("calib") if len(encode_prompt(tokenizer, t)) >= cfg.prompt_tokens]
    results = {}
    for seed in args.seeds:
        results[seed] = seed_truth(args, cfg, ev, seed, texts)
        (args.out / "truth.json").write_text(json.dumps(results, indent=1))
    (args.out / "truth.md").write_text(table(results, args.budgets))
    print(table(results, args.budgets))


if __name__ == "__main__":
    main()
