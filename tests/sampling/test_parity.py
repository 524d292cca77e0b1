"""Parity of a student against the teacher's recorded runs."""

import pytest

from faircalib.models.tiny import tiny_denoiser
from faircalib.sampling import LLaDASampling, record_runs
from faircalib.sampling.parity import evaluate_parity, teacher_post_commit_mismatch


def test_the_teacher_against_itself_scores_its_own_post_commit_level():
    """The level reported beside a student's post_commit_mismatch is what the teacher scores as its own
    student: same rollouts, same probes."""
    teacher = tiny_denoiser("llada", seed=0)
    sampling = LLaDASampling(gen_length=8, block_length=4, steps=8)
    references = record_runs(teacher, [[3, 4, 5], [6, 7, 8], [9, 10]], sampling, teacher.spec)
    own = teacher_post_commit_mismatch(teacher, references, sampling, teacher.spec, probes=2)
    summary = evaluate_parity(teacher, references, sampling, teacher.spec, post_commit_probes=2).summary()
    assert summary["frontier_flip_rate"] == 0 and summary["post_commit_mismatch"] == own
    assert summary["post_commit_mismatch_forced"] == own
    assert 0 < own < 1


def test_a_gate_names_each_metric_that_misses_and_by_how_much():
    from faircalib.errors import ConfigError
    from faircalib.sampling.parity import check_gate

    report = {"frontier_flip_rate": 0.041, "exact_match": 0.9, "frontier_write_error": float("nan")}
    assert check_gate(report, "frontier_flip_rate<=0.05, exact_match>=0.8") == []
    assert check_gate(report, "frontier_flip_rate<=0.03,exact_match>=0.95") == [
        "frontier_flip_rate 0.0410 is not <= 0.03 (off by 0.0110)",
        "exact_match 0.9000 is not >= 0.95 (off by 0.0500)",
    ]
    assert check_gate(report, "frontier_write_error<=1,task_accuracy>=0.8") == [
        "frontier_write_error is not in the report", "task_accuracy is not in the report",
    ]  # fmt: skip
    for bad in ("frontier_flip_rate<0.03", "frontier_flip_rate<=x", ""):
        with pytest.raises(ConfigError):
            check_gate(report, bad)


# Parity of the bundled model against itself on N held-out prompts in a fresh process; prints its peak resident set.
PARITY_CHILD = """
import sys, torch
from faircalib.calib.runner import host_peak_mb
from faircalib.models import load_denoiser, load_tokenizer
from faircalib.sampling import LLaDASampling
from faircalib.sampling.parity import parity_report
from faircalib.zoo import model_dir, wiki

torch.set_num_threads(1)
model, tokenizer = load_denoiser(model_dir()), load_tokenizer(model_dir())
prompts = wiki.prompt_ids(tokenizer, "eval", int(sys.argv[1]), 16)
sampling = LLaDASampling(gen_length=16, block_length=8, steps=16)
parity_report(model, model, prompts, sampling, model.spec, post_commit_probes=1)
print(host_peak_mb())
"""


def parity_peak_mb(prompts: int) -> float:
    import os
    import subprocess
    import sys

    # glibc's sliding mmap threshold keeps freed temporaries in the heap by chance: identical runs then peak
    # up to 100 MiB apart. A fixed threshold hands them back, so the peak is what parity holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run([sys.executable, "-c", PARITY_CHILD, str(prompts)], capture_output=True, text=True,
                          check=True, env=env)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_parity_memory_does_not_grow_with_the_prompts():
    few, many = parity_peak_mb(32), parity_peak_mb(256)
    assert many <= 1.2 * few, f"peak {many:.0f} MiB on 256 prompts against {few:.0f} MiB on 32"
