"""Which held-out problems a task model's students lose and gain against the teacher, and which decision broke
each answer the student wrote differently: at the student's first write error (a committed token that differs
from the teacher's final answer there), the teacher is asked to decide from the student's own state.

- "token": the teacher would commit the same position there, with another token: a flipped token decision;
- "order": the teacher would commit another position: a flipped order decision (which cell to fill next);
- "inherited": the teacher would write the same wrong token: earlier harmless-looking differences (another
  order among sure cells) had already led the state where the teacher fails too.

    python benchmarks/task_paired.py --model faircalib/zoo/llada-sudoku-tiny --n 500 \
        --artifacts runs/bench-sudoku-w4a4/artifacts/* --out runs/task-paired.json

Printed: per artifact, solved / lost (teacher right, student wrong) / gained / answers changed, and what broke
the lost ones; written: the per-problem outcomes.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path

import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.data import task_data, task_of
from faircalib.models import load_denoiser, load_tokenizer
from faircalib.sampling import decide, default_sampling, record_runs, step_logits


def first_error(teacher, schedule, reference, run, sampling) -> list[tuple[str, int, float] | None]:
    """Per row of one batch: (what broke, step, the teacher's lead) at the student's first write error; None when
    it wrote the teacher's answer. The lead: how much more confident the teacher is, at the student's state, in
    the position it would commit than in the one the student committed."""
    spec, prompt = teacher.spec, reference.prompt_length
    out: list[tuple[str, int, float] | None] = [None] * reference.tokens.shape[0]
    for index, (step, record) in enumerate(zip(schedule.steps, run.trajectory.steps, strict=True)):
        wrong = ((record.committed_tokens != reference.tokens) & record.committed).any(1)
        rows = [r for r in wrong.nonzero().flatten().tolist() if out[r] is None]
        if not rows:
            continue
        state = record.tokens[rows]
        asked = decide(step_logits(teacher, state, prompt, sampling, spec), state, index, step, prompt, sampling, spec)
        for i, row in enumerate(rows):
            mine, theirs = record.committed[row], asked.committed[i]
            same_token = torch.equal(asked.candidates[i][theirs], record.committed_tokens[row][mine])
            kind = "order" if not torch.equal(theirs, mine) else "inherited" if same_token else "token"
            lead = float(asked.confidence[i][theirs].min() - asked.confidence[i][mine].max())
            out[row] = (kind, index, lead)
    return out


def outcomes(teacher, reference_runs, student_runs, sampling, judge) -> tuple[list[bool], list]:
    solved, broke = [], []
    for (schedule, reference), (_, run) in zip(reference_runs, student_runs, strict=True):
        prompts = reference.tokens[:, : reference.prompt_length].tolist()
        solved += list(map(judge, prompts, run.generated.tolist()))
        broke += first_error(teacher, schedule, reference, run, sampling)
    return solved, broke


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="faircalib/zoo/llada-sudoku-tiny")
    parser.add_argument("--artifacts", nargs="+", type=Path, required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    teacher, tokenizer = load_denoiser(args.model), load_tokenizer(args.model)
    task = task_of(args.model)
    sampling = default_sampling(teacher.spec, **task["sampling"])
    data = task_data(tokenizer, task, args.n, "eval")
    with torch.no_grad():
        reference = record_runs(teacher, data.prompts, sampling, teacher.spec, batch_size=128)
        teacher_solved, _ = outcomes(teacher, reference, reference, sampling, data.judge)
        results = {"teacher": teacher_solved}
        for path in sorted(args.artifacts):
            student = QuantArtifact.load(path).apply(copy.deepcopy(teacher))
            runs = record_runs(student, data.prompts, sampling, teacher.spec, batch_size=128)
            solved, broke = outcomes(teacher, reference, runs, sampling, data.judge)
            pairs = list(zip(teacher_solved, solved, strict=True))
            lost = [i for i, (t, s) in enumerate(pairs) if t and not s]
            gained = [i for i, (t, s) in enumerate(pairs) if s and not t]
            changed = sum(b is not None for b in broke)
            kinds = Counter(broke[i][0] for i in lost)
            leads = sorted(round(broke[i][2], 3) for i in lost)
            results[path.name] = {"solved": solved, "lost": lost, "gained": gained, "broke": broke}
            print(f"{path.name:24s} solved {sum(solved) / len(solved):.4f}  lost {len(lost):3d}  gained "
                  f"{len(gained):3d}  changed {changed:3d}  lost by {dict(kinds)}  teacher leads {leads}",
                  flush=True)  # fmt: skip
    print(f"teacher solved {sum(teacher_solved) / len(teacher_solved):.4f} of {len(teacher_solved)}")
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
