"""The teacher probe and position prior on hand-built trajectories with known answers."""

import pytest
import torch

from faircalib.calib.probe import (
    ProbeStats,
    commit_threshold,
    frontier,
    position_prior,
    probe_statistics,
    token_weights,
)
from faircalib.errors import ConfigError
from faircalib.models.base import DenoiserSpec
from faircalib.sampling import LLaDASampling, generate
from faircalib.sampling.trajectory import StepRecord

VOCAB, MASK = 8, 7
SPEC = DenoiserSpec("test", MASK, (), VOCAB, logit_shift=False, sampler="llada")
ONE_PER_STEP = LLaDASampling(gen_length=4, block_length=4, steps=4)


def ordered_teacher(x):
    """Position p prefers token p with strength p: positions commit from the last generated one back."""
    logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
    for p in range(x.shape[1]):
        logits[:, p, p] = float(p)
    return logits


def changing_mind_teacher(x):
    """Like ordered_teacher, but position 1 predicts 5 while position 4 is masked, 6 afterwards."""
    logits = ordered_teacher(x)
    logits[:, 1, 1] = 0.0
    late = x[:, 4] != MASK
    logits[:, 1, 5] = torch.where(late, 0.0, 1.0)
    logits[:, 1, 6] = torch.where(late, 1.0, 0.0)
    return logits


def test_frontier_is_commits_plus_near_misses():
    run = generate(ordered_teacher, torch.tensor([[0]]), ONE_PER_STEP, SPEC, record=True)
    fronts = [frontier(step)[0, 1:].tolist() for step in run.trajectory.steps]
    assert fronts == [
        [False, False, True, True],  # commits offset 3, near miss offset 2
        [False, True, True, False],
        [True, True, False, False],
        [True, False, False, False],  # nothing eligible is left to miss
    ]
    stats = probe_statistics([run], MASK)
    assert stats.frontier_hits.tolist() == [2.0, 2.0, 2.0, 1.0]
    assert stats.reliability.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_reliability_measures_stability_lag():
    run = generate(changing_mind_teacher, torch.tensor([[0]]), ONE_PER_STEP, SPEC, record=True)
    assert run.generated[0, 0] == 6
    stats = probe_statistics([run, run], MASK)  # two identical trajectories: hits are per trajectory
    assert stats.reliability[0] == pytest.approx(3 / 4)  # wrong only while position 4 was masked
    assert stats.reliability[1:].tolist() == [1.0, 1.0, 1.0]
    assert stats.trajectories == 2


def test_prior_mixes_normalised_terms():
    stats = ProbeStats(torch.tensor([2.0, 2.0, 2.0, 1.0]), torch.tensor([1.0, 0.5, 1.0, 1.0]), 1)
    frontier_only = position_prior(stats, lam=1.0)
    reliability_only = position_prior(stats, lam=0.0)
    assert frontier_only.tolist() == pytest.approx([8 / 7, 8 / 7, 8 / 7, 4 / 7])
    assert reliability_only.tolist() == pytest.approx([0.0, 4.0, 0.0, 0.0])
    torch.testing.assert_close(position_prior(stats, lam=0.5), (frontier_only + reliability_only) / 2)
    assert float(position_prior(stats).mean()) == pytest.approx(1.0)


def test_prior_pools_by_offset_within_the_block():
    stats = ProbeStats(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.ones(4), 1)
    assert position_prior(stats, lam=1.0, block_length=2).tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="not a multiple of block_length"):
        position_prior(stats, block_length=3)


def record_with(confidence, committed, margin, tokens):
    c = torch.tensor([confidence])
    return StepRecord(
        step=0,
        block=0,
        tokens=torch.tensor([tokens]),
        committed=torch.tensor([committed]),
        committed_tokens=torch.tensor([tokens]),
        top1=torch.zeros(1, len(tokens), dtype=torch.long),
        top1_prob=torch.zeros_like(c),
        margin=torch.tensor([margin]),
        confidence=c,
        top2=torch.ones(1, len(tokens), dtype=torch.long),
        logit_gap=torch.zeros_like(c),
    )


def test_commit_threshold_sits_between_in_and_out():
    inf = float("inf")
    record = record_with([-inf, 0.9, 0.8, 0.3], [False, True, False, False], [0, 0, 0, 0], [1, MASK, MASK, MASK])
    assert commit_threshold(record).item() == pytest.approx(0.85)


def test_token_weights_boundary():
    inf = float("inf")
    record = record_with(
        confidence=[-inf, 0.9, 0.85, 0.3, -inf],
        committed=[False, True, False, False, False],
        margin=[0, 0.5, 0.1, 0.9, 0.2],
        tokens=[1, MASK, MASK, MASK, 4],
    )
    prior = torch.tensor([1.0, 2.0, 1.0, 1.0])
    w = token_weights(record, 1, prior, MASK, beta=4.0, w_max=100.0, tau=0.1)
    threshold = 0.875
    expected = [
        1 + 4 * torch.exp(torch.tensor(-abs(c - threshold) / 0.1)).item() * p
        for c, p in ((0.9, 1), (0.85, 2), (0.3, 1))
    ]
    assert w[0, 1:4].tolist() == pytest.approx(expected, rel=1e-5)
    assert w[0, 0] == 1 and w[0, 4] == 1
    clipped = token_weights(record, 1, prior, MASK, beta=4.0, w_max=2.0, tau=0.1)
    assert float(clipped.max()) == 2.0


def test_token_weights_reject_mismatched_prior():
    record = record_with([0.1, 0.2], [False, True], [0, 0], [1, MASK])
    with pytest.raises(ConfigError, match="prior covers 3 positions"):
        token_weights(record, 1, torch.ones(3), MASK)
