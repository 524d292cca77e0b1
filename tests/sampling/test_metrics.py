"""Parity metrics on hand-built denoisers whose decisions are known in advance."""

import math

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling import LLaDASampling, generate, plan
from faircalib.sampling.metrics import (
    ParityTally,
    masked_nll,
    post_commit_counts,
    teacher_forced_counts,
)
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


def run(student, sampling=SAMPLING, probes=1):
    teacher = generate(TEACHER, PROMPT, sampling, SPEC, record=True)
    rollout = generate(student, PROMPT, sampling, SPEC, record=True)
    tally = ParityTally()
    tally.add(student, teacher, rollout, sampling, SPEC, plan(sampling, 1), post_commit_probes=probes)
    return tally.summary()


def test_identical_student_has_perfect_parity():
    summary = run(TEACHER)
    assert summary["frontier_flip_rate"] == 0
    assert summary["commit_set_disagreement"] == 0
    assert summary["frontier_write_error"] == 0
    assert summary["decision_margin_error"] == 0
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


def two_best(gaps):
    """Position p prefers token p with logit p and then token p + 1, ``gaps[p]`` lower."""

    def denoise(x):
        logits = torch.full((x.shape[0], x.shape[1], VOCAB), -10.0)
        for p in range(x.shape[1]):
            logits[:, p, p] = float(p)
            logits[:, p, p + 1] = p - gaps[p]
        return logits

    return denoise


def test_decision_margin_error_is_the_mean_move_of_the_teachers_top_two_gap():
    teacher = two_best([1.0] * 5)
    reference = generate(teacher, PROMPT, SAMPLING, SPEC, record=True)
    step = reference.trajectory.steps[0]
    assert step.top2[0, 4] == 5 and step.logit_gap[0, 4] == pytest.approx(1.0)

    def margin_error(student):
        counts = teacher_forced_counts(student, reference, SAMPLING, SPEC, plan(SAMPLING, 1))
        return float(counts["margin_error"].sum()) / int(counts["teacher_commits"].sum())

    assert margin_error(teacher) == 0
    # the teacher commits positions 4, 3, 2, 1: position 0 (the prompt) is never read
    assert margin_error(two_best([5.0, 1.0, 0.7, 1.0, 1.0])) == pytest.approx(0.3 / 4)
    flipped = two_best([1.0, 1.0, 1.0, -0.5, 2.0])  # position 3 now prefers token 4
    assert margin_error(flipped) == pytest.approx((1.5 + 1.0) / 4)
    tally = ParityTally()
    tally.add(flipped, reference, generate(flipped, PROMPT, SAMPLING, SPEC, record=True), SAMPLING, SPEC,
              plan(SAMPLING, 1))  # fmt: skip
    assert tally.summary()["decision_margin_error"] == pytest.approx(2.5 / 4)
    assert tally.summary()["frontier_flip_rate"] == pytest.approx(1 / 4)


def test_post_commit_mismatch_asks_with_the_position_masked_again():
    """Rows with one committed position each, so the estimate is exact: the model is asked at that
    position with it masked again, and answers by a table (and something else when it can see it)."""
    m = MASK
    states = [[1, m, m, m], [1, 5, m, m], [1, 5, 6, m]]
    steps = [
        StepRecord(i, 0, torch.tensor([s]), torch.zeros(1, 4, dtype=torch.bool), torch.tensor([s]),
                   torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4),
                   torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4))
        for i, s in enumerate(states)
    ]  # fmt: skip
    rollout = GenerationResult(torch.tensor([[1, 5, 6, 2]]), 1, Trajectory(1, steps))

    def denoise(x):
        """Masked position 1 predicts 5 until position 2 is filled, then 4; position 2 always predicts 6."""
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        late = x[:, 2] != m
        logits[:, 1, 5] = torch.where(late, 0.0, 1.0)
        logits[:, 1, 4] = torch.where(late, 1.0, 0.0)
        logits[:, 2, 6] = 1.0
        logits[:, :, 0] += (x != m).float() * 10  # visible positions say "0": must not be what is read
        return logits

    counts = post_commit_counts(denoise, rollout, SAMPLING, SPEC, seed=0)
    assert counts["settled_pairs"].tolist() == [0, 1, 2]
    # step 2 has two committed positions; whichever is probed, its answer is weighted by 2
    assert counts["post_commit_mismatches"].tolist()[:2] == [0, 0]
    assert counts["post_commit_mismatches"][2] in (0, 2)
    probed = [
        post_commit_counts(denoise, rollout, SAMPLING, SPEC, seed=s)["post_commit_mismatches"][2] for s in range(20)
    ]
    assert set(int(p) for p in probed) == {0, 2}  # position 1 changed its mind, position 2 did not


def _leave_one_out(model, rollout, prompt_length, gen_length):
    """(pairs, changed): every committed generated position of every step, masked again, one at a time."""
    pairs = changed = 0
    for record in rollout.trajectory.steps:
        for row in range(record.tokens.shape[0]):
            for p in range(prompt_length, prompt_length + gen_length):
                if record.tokens[row, p] != model.spec.mask_token_id:
                    probe = record.tokens[row : row + 1].clone()
                    probe[0, p] = model.spec.mask_token_id
                    pairs += 1
                    changed += int(model(probe)[0, p].argmax() != record.tokens[row, p])
    return pairs, changed


def test_post_commit_estimate_is_unbiased_over_pairs():
    """On a rollout of a real (tiny) model, the one-probe-per-step estimate matches leave-one-out on
    every pair, averaged over seeds; with as many probes as generated positions it is leave-one-out."""
    from faircalib.models.tiny import tiny_denoiser

    model = tiny_denoiser("llada", seed=0)
    sampling = LLaDASampling(gen_length=8, block_length=8, steps=8)
    rollout = generate(model, torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]]), sampling, model.spec, record=True)
    exact_pairs, exact_changed = _leave_one_out(model, rollout, 3, 8)
    assert exact_changed > 0  # else the comparisons below hold trivially
    estimates = []
    for seed in range(60):
        c = post_commit_counts(model, rollout, sampling, model.spec, seed=seed)
        assert int(c["settled_pairs"].sum()) == exact_pairs
        estimates.append(float(c["post_commit_mismatches"].sum()) / exact_pairs)
    assert abs(sum(estimates) / len(estimates) - exact_changed / exact_pairs) < 0.05
    for seed in range(3):
        every = post_commit_counts(model, rollout, sampling, model.spec, seed=seed, probes=8)
        assert float(every["post_commit_mismatches"].sum()) == pytest.approx(exact_changed)
    with pytest.raises(ConfigError, match="probes"):
        post_commit_counts(model, rollout, sampling, model.spec, probes=0)


def test_more_post_commit_probes_stay_unbiased():
    """Three probes of a row's positions, weighted by positions over probes: the mean over seeds is still
    leave-one-out's rate, with less spread than one probe."""
    from faircalib.models.tiny import tiny_denoiser

    model = tiny_denoiser("llada", seed=0)
    sampling = LLaDASampling(gen_length=8, block_length=8, steps=8)
    rollout = generate(model, torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]]), sampling, model.spec, record=True)
    pairs, changed = _leave_one_out(model, rollout, 3, 8)
    spread = {}
    for probes in (1, 3):
        rates = torch.tensor([
            float(post_commit_counts(model, rollout, sampling, model.spec, seed=s, probes=probes)
                  ["post_commit_mismatches"].sum()) / pairs
            for s in range(60)
        ])  # fmt: skip
        assert abs(float(rates.mean()) - changed / pairs) < 0.05
        spread[probes] = float(rates.std())
    assert spread[3] < spread[1]


def test_forced_post_commit_mismatch_asks_about_the_teachers_commits():
    """A student that writes 5 where the teacher wrote 4 first, and never changes its mind, is perfectly
    steady in its own rollout, as steady as the teacher: only the teacher-forced form sees it disagree
    with what the teacher committed, at every later step (1 of 1, 2 and 3 committed positions)."""
    student = fixed_denoiser([0, 1, 2, 3, 5], [0.0, 1.0, 2.0, 3.0, 4.0])
    summary = run(student, probes=4)  # probes >= committed positions: every pair is asked
    assert summary["post_commit_mismatch"] == 0
    assert summary["post_commit_mismatch_forced"] == pytest.approx(3 / 6)
    assert summary["curves"]["post_commit_mismatch_forced"] == [None, 1.0, 0.5, pytest.approx(1 / 3)]
    assert run(TEACHER, probes=4)["post_commit_mismatch_forced"] == 0


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
