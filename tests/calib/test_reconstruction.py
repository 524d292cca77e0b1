"""Block reconstruction from the GPTQ solution: it lowers the weighted error or is undone."""

import torch

from faircalib.calib.config import preset
from faircalib.calib.gptq import gptq_quantize
from faircalib.calib.hessian import weighted_gram
from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, QuantLinear, replace_linear
from faircalib.calib.objectives import weighted_mse
from faircalib.calib.quant import ActSpec
from faircalib.calib.reconstruction import HeadTerm, LearnableQuantLinear, reconstruct_block
from faircalib.models.tiny import tiny_denoiser


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
        replace_linear(block, name, QuantLinear(QuantizedLayer(quantized, ActSpec(abits)), None, torch.float32))
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
    layer = LearnableQuantLinear(
        QuantizedLayer(QuantizedWeight(solved.codes, solved.scale, None, spec), ActSpec(4)), None
    )
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
