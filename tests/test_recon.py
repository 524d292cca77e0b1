import torch

from faircalib.calib.config import preset
from faircalib.calib.gptq import gptq_quantize
from faircalib.calib.hessian import weighted_gram
from faircalib.calib.linear import QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.pipeline import decision_masks
from faircalib.calib.quant import ActSpec
from faircalib.calib.recon import HeadTerm, LearnableQuantLinear, reconstruct_block, weighted_kl, weighted_mse
from faircalib.models.base import DenoiserSpec
from faircalib.models.tiny import tiny_denoiser


def test_weighted_kl_matches_a_manual_computation():
    t, s = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    manual = ((p * (p.log() - q.log())).sum(-1) * w).sum() / w.sum()
    torch.testing.assert_close(weighted_kl(s, t, w), manual)
    assert float(weighted_kl(t, t, w)) < 1e-6


def quantized_block(abits=16):
    model = tiny_denoiser("llada", seed=5)
    block = model.blocks[0]
    ids = torch.randint(0, 90, (6, 12), generator=torch.Generator().manual_seed(0))
    ctx = model.block_context(ids)
    x = model.embed(ids).detach()
    with torch.no_grad():
        target = block(x, ctx)
    spec = preset("gptq").weight_spec()
    names = [n for g in model.linear_groups() for n in g]
    for name in names:
        w = block.get_submodule(name).weight.detach()
        h, _ = weighted_gram(torch.randn(64, w.shape[1]))
        solved = gptq_quantize(w, h, spec)  # a deliberately poor Hessian leaves room to improve
        quantized = QuantizedWeight(solved.codes, solved.scale, None, spec)
        replace_linear(block, name, QuantLinear(quantized, None, ActSpec(abits), torch.float32))
    return model, block, names, x, target, ctx, ids


def test_reconstruction_lowers_the_weighted_error_and_keeps_codes_on_the_grid():
    model, block, names, x, target, ctx, ids = quantized_block()
    weights = torch.rand(6, 12) + 0.5
    with torch.no_grad():
        before = float(weighted_mse(block(x, ctx), target, weights))
    report = reconstruct_block(
        block, lambda b, h, c: b(h, ctx), names, [x], [target], [weights], steps=30, lr=5e-3, batch=4, seed=0
    )
    with torch.no_grad():
        after = float(weighted_mse(block(x, ctx), target, weights))
    assert report.kept and after < before and report.loss_after < report.loss_before == 1.0
    layer = block.get_submodule(names[0])
    assert isinstance(layer, QuantLinear) and int(layer.quantized.codes.min()) >= -8
    assert int(layer.quantized.codes.max()) <= 7


def test_a_clip_ratio_pushed_past_its_bound_still_learns():
    # One step that drives the clip up, as an early minibatch may: from its start at 1.0 it overshoots,
    # and a clamp in the forward pass would then pass no gradient to it for the rest of the run.
    torch.manual_seed(0)
    spec = preset("gptq").weight_spec()
    solved = gptq_quantize(torch.randn(8, 16), torch.eye(16), spec)
    layer = LearnableQuantLinear(QuantizedWeight(solved.codes, solved.scale, None, spec), None, ActSpec(4))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    (-layer.act_clip).backward()
    optimizer.step()
    layer.project_()
    assert layer.act_clip.item() == 1.0
    layer.zero_grad()
    layer(torch.randn(4, 16) * 3).pow(2).sum().backward()
    assert layer.act_clip.grad.abs().item() > 0


def test_reconstruction_that_does_not_help_is_undone():
    model, block, names, x, target, ctx, ids = quantized_block()
    originals = {n: block.get_submodule(n) for n in names}
    report = reconstruct_block(
        block, lambda b, h, c: b(h, ctx), names, [x], [target], [torch.ones(6, 12)], steps=3, lr=10.0, batch=4, seed=0
    )  # a wild learning rate makes things worse
    assert not report.kept
    assert all(block.get_submodule(n) is originals[n] for n in names)


def test_head_term_is_part_of_the_objective():
    model, block, names, x, target, ctx, ids = quantized_block()
    masks = [ids % 2 == 0]
    head = HeadTerm(model.head, masks, weight=1.0)
    report = reconstruct_block(
        block, lambda b, h, c: b(h, ctx), names, [x], [target], [torch.ones(6, 12)], steps=20, lr=5e-3, batch=4,
        seed=0, head=head,
    )  # fmt: skip
    assert report.loss_before == 2.0 and report.loss_after < 2.0


def test_decision_masks_follow_the_logit_shift():
    tokens = [torch.tensor([[1, 9, 9, 2, 9]])]
    plain = DenoiserSpec("x", 9, (), 10, logit_shift=False, sampler="llada")
    shifted = DenoiserSpec("x", 9, (), 10, logit_shift=True, sampler="dream")
    assert decision_masks(tokens, plain)[0].tolist() == [[False, True, True, False, True]]
    assert decision_masks(tokens, shifted)[0].tolist() == [[True, True, False, True, False]]
