"""Parity metrics on hand-built denoisers whose decisions are known in advance."""

import math

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling import LLaDASampling, generate, plan
from faircalib.sampling.metrics import ParityTally, masked_nll, post_commit_counts, teacher_forced_counts
from faircalib.sampling.trajectory import GenerationResult, StepRecord, Trajectory

VOCAB, MASK = 8, 7
SPEC = DenoiserSpec("test", MASK, (), VOCAB, logit_shift=False, sampler="llada")
SAMPLING = LLaDASampling(gen_length=4, block_length=4, steps=4)  # one commit per step
PROMPT = torch.tensor([[1]])


def fixed_denoiser(tokens_at, strength_at):
    """Logits that ignore the input: position p prefers tokens_at[p] with logit strength_at[p]."""

    def denoise(x):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        for p in range(x.shape[1]):
            logits[:, p, tokens_at[p]] = strength_at[p]
        return logits

    return denoise


TEACHER = fixed_denoiser([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0])  # commits positions 4, 3, 2, 1 in turn


def run(student, sampling=SAMPLING):
    teacher = generate(TEACHER, PROMPT, sampling, SPEC, record=True)
    rollout = generate(student, PROMPT, sampling, SPEC, record=True)
    tally = ParityTally()
    tally.add(student, teacher, rollout, sampling, SPEC, plan(sampling, 1))
    return tally.summary()


def test_identical_student_has_perfect_parity():
    summary = run(TEACHER)
    assert summary["frontier_flip_rate"] == 0
    assert summary["commit_set_disagreement"] == 0
    assert summary["frontier_write_error"] == 0
    assert summary["teacher_divergence"] == 0 and summary["exact_match"] == 1


def test_one_flipped_token():
    student = fixed_denoiser([0, 1, 5, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0])  # position 2 writes 5, not 2
    summary = run(student)
    assert summary["frontier_flip_rate"] == pytest.approx(1 / 4)
    assert summary["commit_set_disagreement"] == 0  # same order
    assert summary["frontier_write_error"] == pytest.approx(1 / 4)
    assert summary["teacher_divergence"] == pytest.approx(1 / 4) and summary["exact_match"] == 0
    assert summary["curves"]["frontier_flip_rate"] == [0.0, 0.0, 1.0, 0.0]  # position 2 is committed third


def test_swapped_order_is_a_set_miss_but_not_a_flip():
    student = fixed_denoiser([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 4.0, 3.0])  # prefers position 3 first
    summary = run(student)
    assert summary["frontier_flip_rate"] == 0
    assert summary["commit_set_disagreement"] == pytest.approx(1 / 4)
    assert summary["curves"]["commit_set_disagreement"] == [1.0, 0.0, 0.0, 0.0]
    assert summary["frontier_write_error"] == 0  # the reordered commit still writes the teacher's token
    assert summary["teacher_divergence"] == 0


def test_post_commit_mismatch_on_a_hand_built_rollout():
    m = MASK
    states = [[1, m, m, m], [1, 5, m, m], [1, 5, 6, m]]
    top1 = [[0, 5, 6, 2], [0, 5, 6, 2], [0, 4, 6, 2]]  # step 2: position 1 (committed 5) now predicts 4
    steps = [
        StepRecord(i, 0, torch.tensor([s]), torch.zeros(1, 4, dtype=torch.bool), torch.tensor([s]),
                   torch.tensor([t]), torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4))
        for i, (s, t) in enumerate(zip(states, top1, strict=True))
    ]  # fmt: skip
    rollout = GenerationResult(torch.tensor([[1, 5, 6, 2]]), 1, Trajectory(1, steps))
    counts = post_commit_counts(rollout, m)
    assert counts["settled_pairs"].tolist() == [0, 1, 2]
    assert counts["post_commit_mismatches"].tolist() == [0, 0, 1]


def test_counts_pool_over_batches():
    student = fixed_denoiser([0, 1, 5, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0])
    teacher = generate(TEACHER, PROMPT, SAMPLING, SPEC, record=True)
    rollout = generate(student, PROMPT, SAMPLING, SPEC, record=True)
    tally = ParityTally()
    for _ in range(3):
        tally.add(student, teacher, rollout, SAMPLING, SPEC, plan(SAMPLING, 1))
    assert tally.summary()["teacher_commits"] == 12
    assert tally.summary()["frontier_flip_rate"] == pytest.approx(1 / 4)


def test_teacher_forced_needs_trajectory_and_determinism():
    teacher = generate(TEACHER, PROMPT, SAMPLING, SPEC)
    with pytest.raises(ConfigError, match="needs the teacher's trajectory"):
        teacher_forced_counts(TEACHER, teacher, SAMPLING, SPEC, plan(SAMPLING, 1))
    noisy = LLaDASampling(gen_length=4, block_length=4, steps=4, temperature=1.0)
    teacher = generate(TEACHER, PROMPT, noisy, SPEC, record=True)
    with pytest.raises(ConfigError, match="deterministic schedule"):
        teacher_forced_counts(TEACHER, teacher, noisy, SPEC, plan(noisy, 1))


def test_masked_nll_of_a_uniform_model_is_log_vocab():
    def uniform(x):
        return torch.zeros(x.shape[0], x.shape[1], VOCAB)

    windows = torch.randint(0, 6, (2000, 16), generator=torch.Generator().manual_seed(0))
    assert masked_nll(uniform, windows, SPEC) == pytest.approx(math.log(VOCAB), rel=0.05)
