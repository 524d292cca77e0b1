"""The objectives of Stage II's learned parts, and where decisions are made."""

import torch

from faircalib.calib.objectives import decision_masks, weighted_kl
from faircalib.models.base import DenoiserSpec


def test_weighted_kl_matches_a_manual_computation():
    t, s = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    manual = ((p * (p.log() - q.log())).sum(-1) * w).sum() / w.sum()
    torch.testing.assert_close(weighted_kl(s, t, w), manual)
    assert float(weighted_kl(t, t, w)) < 1e-6


def test_decision_masks_follow_the_logit_shift():
    tokens = [torch.tensor([[1, 9, 9, 2, 9]])]
    plain = DenoiserSpec("x", 9, (), 10, logit_shift=False, sampler="llada")
    shifted = DenoiserSpec("x", 9, (), 10, logit_shift=True, sampler="dream")
    assert decision_masks(tokens, plain)[0].tolist() == [[False, True, True, False, True]]
    assert decision_masks(tokens, shifted)[0].tolist() == [[True, True, False, True, False]]
