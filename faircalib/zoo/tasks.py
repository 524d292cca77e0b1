"""A task whose answers can be checked: 4x4 mini sudoku from reasoning-gym (generator and verifier), in a compact
character format the bundled task model reads and writes.

A puzzle ``4___/_3__/_13_/____=`` (rows of a grid, blanks as ``_``) is followed by its solution
``4213/1342/2134/3421`` and an end-of-text token. The split is by reasoning-gym's per-item seeds, which are the
dataset seed plus the item's index: training takes items from seed ``TRAIN_SEED`` on, held-out problems from
seed ``HELD_OUT_SEED`` on (a range training never reaches; calibration draws from ``CALIB_SEED`` on), and held-out
puzzles that also occur in training are skipped (the others' indices are in the model's task.json), so no held-out
puzzle was ever seen.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Any

from faircalib.errors import FaircalibError

TASK = "mini_sudoku"
GENERATOR = dict(min_empty=12, max_empty=12)  # 12 blanks of 16, the most it makes: where the order of decisions matters
TRAIN_SEED, HELD_OUT_SEED, CALIB_SEED = 0, 10**9, 2 * 10**9
INSTALL_HINT = "pip install reasoning-gym==0.1.25"
ANSWER_CHARS = 19  # four rows of four digits and three separators
ALPHABET = "1234_/="
HELD_OUT_RANGE = 8192  # held-out items searched for puzzles training never saw (most 4x4 puzzles it does)


@dataclass(frozen=True)
class Problem:
    prompt: str  # the puzzle in the compact format, ending with "="
    answer: str  # the solution in the compact format
    entry: dict[str, Any]  # reasoning-gym's item, for its verifier


def _dataset(seed: int, size: int):
    if importlib.util.find_spec("reasoning_gym") is None:
        raise FaircalibError(f"the task generator is not installed: {INSTALL_HINT}")
    import reasoning_gym

    return reasoning_gym.create_dataset(TASK, seed=seed, size=size, **GENERATOR)


def compact(grid: list[list[int]]) -> str:
    return "/".join("".join(str(v) if v else "_" for v in row) for row in grid)


def problem(entry: dict[str, Any]) -> Problem:
    meta = entry["metadata"]
    return Problem(compact(meta["puzzle"]) + "=", compact(meta["solution"]), entry)


def training_problems(n: int) -> list[Problem]:
    """The first ``n`` training problems."""
    dataset = _dataset(TRAIN_SEED, n)
    return [problem(dataset[i]) for i in range(n)]


def calibration_problems(n: int) -> list[Problem]:
    """``n`` problems for calibration, from a seed range neither training nor the held-out problems use."""
    dataset = _dataset(CALIB_SEED, n)
    return [problem(dataset[i]) for i in range(n)]


def unseen_held_out(training: list[Problem], size: int = HELD_OUT_RANGE) -> list[int]:
    """Indices among the first ``size`` held-out items whose puzzles do not occur in ``training``: written to a
    task model's task.json, so finding its held-out problems does not regenerate the training pool."""
    puzzles = {p.prompt for p in training}
    dataset = _dataset(HELD_OUT_SEED, size)
    return [i for i in range(size) if problem(dataset[i]).prompt not in puzzles]


def held_out_problems(n: int, unseen: list[int]) -> list[Problem]:
    """The first ``n`` held-out problems training never saw (``unseen``: their indices, from ``unseen_held_out``)."""
    if n > len(unseen):
        raise FaircalibError(f"{n} held-out problems asked for; the task model has {len(unseen)}")
    dataset = _dataset(HELD_OUT_SEED, unseen[n - 1] + 1 if n else 0)
    return [problem(dataset[i]) for i in unseen[:n]]


def verify(item: Problem, written: str) -> bool:
    """Whether ``written`` (the compact answer a model wrote) solves the puzzle, by reasoning-gym's verifier."""
    rows = written.strip().split("/")
    if len(rows) != 4 or any(len(row) != 4 for row in rows):
        return False
    text = "\n".join(" ".join(row) for row in rows)
    return _verifier().score_answer(text, item.entry) == 1.0


@cache
def _verifier():
    return _dataset(HELD_OUT_SEED, 1)
