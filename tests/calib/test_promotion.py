"""Mixed precision: scoring linears, spending the budget, and promoted linears through calibration and artifacts."""

import copy
import json

import pytest
import torch

from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.checkpoint import Checkpoint
from faircalib.calib.config import QuantConfig
from faircalib.calib.linear import QuantLinear, install
from faircalib.calib.promotion import (
    Promotion,
    choose_promoted,
    flip_scores,
    hessian_scores,
    low_bit_layer,
    low_bit_student,
    margin_error,
    pick_rows,
    promoted_specs,
)
from faircalib.calib.quant import ActSpec, WeightSpec
from faircalib.calib.quarot import rotate_model
from faircalib.calib.student import layer_key, linear_names
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from tests.calib.helpers import PROMPTS, SAMPLING, run_calibration, small

MASK = 95  # the tiny LLaDA's mask id


def states(seed=0, rows=6, length=12):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 90, (rows, length), generator=g)
    tokens[torch.rand(rows, length, generator=g) < 0.5] = MASK
    return tokens


def test_margin_error_sums_how_far_each_gap_moved():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5]])
    best = torch.tensor([[0, 1], [1, 2]])  # the teacher's two best tokens
    gap = torch.tensor([1.5, 0.25])  # the teacher's gaps: the first grew by 0.5, the second flipped by 0.75
    assert margin_error(logits, best, gap) == pytest.approx(0.5 + 0.75)


def test_the_budget_buys_the_best_score_per_bit():
    sizes = {"a": 100, "b": 100, "c": 400, "d": 100}
    scores = {"a": 1.0, "b": 3.0, "c": 8.0, "d": -1.0}
    # all-4-bit size 2,800 bits; 10 % is 280 extra bits: one small linear (400 extra bits each) does not fit
    assert choose_promoted(scores, sizes, 10, 4) == []
    # 50 %: 1,400 bits. Per bit b (3/400) beats c (8/1600) beats a (1/400); c then no longer fits, a does
    assert choose_promoted(scores, sizes, 50, 4) == ["b", "a"]
    # everything with a positive score, never the one promotion makes worse
    assert choose_promoted(scores, sizes, 100, 4) == ["b", "c", "a"]
    assert choose_promoted(scores, sizes, 0, 4) == []


def test_promoted_formats():
    weight, act = promoted_specs(WeightSpec(4, 32), ActSpec(4, clip_ratio=0.9))
    assert (weight.bits, weight.group_size, act.bits, act.clip_ratio) == (8, 32, 8, 0.9)
    assert promoted_specs(WeightSpec(4), ActSpec(16))[1].bits == 16  # weight-only stays weight-only


def test_rows_are_spread_over_the_chunks():
    tokens = [torch.arange(40).reshape(20, 2), torch.arange(20).reshape(10, 2)]
    rows = pick_rows(tokens, 12)
    assert sum(t.shape[0] for t in rows) == 12 and all(t.shape[0] <= 8 for t in rows)
    assert rows[0][0, 0] == 0 and rows[-1][-1, 0] == 18  # both ends of each chunk


def reference_flip_scores(model, tokens, cfg):
    """Every linear's score by whole forwards of two separately built students."""
    decided = tokens == MASK
    teacher = model(tokens)[decided].topk(2, dim=-1)
    promoted_weight, promoted_act = promoted_specs(cfg.weight_spec(), cfg.act_spec())

    def error(promoted=None):
        student = copy.deepcopy(model)
        for i, block in enumerate(student.blocks):
            for name in linear_names(student):
                specs = (promoted_weight, promoted_act) if layer_key(i, name) == promoted else (
                    cfg.weight_spec(), cfg.act_spec())  # fmt: skip
                install(block, name, low_bit_layer(block.get_submodule(name), *specs), student.dtype)
        pair = student(tokens)[decided].gather(-1, teacher.indices)
        return float((pair[:, 0] - pair[:, 1] - (teacher.values[:, 0] - teacher.values[:, 1])).abs().sum())

    base = error()
    keys = [layer_key(i, name) for i in range(len(model.blocks)) for name in linear_names(model)]
    return {key: base - error(key) for key in keys}


def test_flip_scores_match_whole_forwards(tiny_dirs):
    """The fast path restarts each promoted student at its linear's block from cached inputs."""
    model = load_denoiser(tiny_dirs["llada"])
    rotate_model(model, 0)
    cfg = QuantConfig(method="custom", abits=4, rotate=True)
    tokens = states()
    before = model(tokens)
    got = flip_scores(model, pick_rows([tokens], 6), cfg)
    want = reference_flip_scores(model, tokens, cfg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert max(got.values()) > 0  # on a random model some linear's promotion still helps
    assert torch.equal(model(tokens), before)  # the full-precision linears are back


def test_hessian_scores_leave_no_gradients(tiny_dirs):
    model = load_denoiser(tiny_dirs["llada"])
    tokens = states()
    scores = hessian_scores(model, pick_rows([tokens], 4), QuantConfig(method="custom", abits=4))
    assert len(scores) == 14 and all(s > 0 for s in scores.values())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_low_bit_student_puts_every_linear_back_on_error(tiny_dirs):
    model = load_denoiser(tiny_dirs["llada"])
    with pytest.raises(RuntimeError, match="stop"), low_bit_student(model, QuantConfig(method="custom", abits=4)):
        assert isinstance(model.blocks[1].get_submodule("ff_out"), QuantLinear)
        raise RuntimeError("stop")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("by", ["flips", "hessian"])
def test_calibration_keeps_promoted_linears_at_8_bits(tiny_dirs, tmp_path, by):
    cfg = small("gptq", abits=4, promote_budget=20, promote_by=by, promote_states=8)
    artifact = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "art")
    promotion = artifact.manifest["promotion"]
    assert promotion["by"] == by and promotion["promoted"] and len(promotion["scores"]) == 14
    size = {k: layer.weight.codes.numel() for k, layer in artifact.layers.items()}
    extra = sum(4 * size[k] for k in promotion["promoted"])
    assert extra <= 0.20 * 4 * sum(size.values())
    loaded = QuantArtifact.load(tmp_path / "art")
    for key, layer in loaded.layers.items():
        wanted = 8 if key in promotion["promoted"] else 4
        assert (layer.weight.spec.bits, layer.act.bits) == (wanted, wanted), key
        assert torch.equal(layer.weight.codes, artifact.layers[key].weight.codes)
        assert int(layer.weight.codes.min()) < -8 or wanted == 4  # 8-bit codes use their range
    student = loaded.apply(load_denoiser(tiny_dirs["llada"]))
    ids = torch.tensor([[5, 9, 17, MASK, MASK, 11]])
    assert torch.equal(student(ids), artifact.apply(load_denoiser(tiny_dirs["llada"]))(ids))


def test_an_artifact_of_format_4_reads_its_layers_in_the_configs_format(tiny_dirs, tmp_path):
    run_calibration(tiny_dirs["llada"], small("rtn", abits=8), SAMPLING, PROMPTS, tmp_path / "art")
    path = tmp_path / "art" / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["layers"].values():
        del entry["wbits"], entry["abits"]
    path.write_text(json.dumps({**manifest, "format_version": 4}))
    layers = QuantArtifact.load(tmp_path / "art").layers
    assert {(layer.weight.spec.bits, layer.act.bits) for layer in layers.values()} == {(4, 8)}


def test_promotion_needs_narrower_weights():
    with pytest.raises(ConfigError, match="8-bit weights"):
        QuantConfig(method="custom", wbits=8, abits=8, promote_budget=10)
    with pytest.raises(ConfigError, match="promote_budget must be >= 0"):
        QuantConfig(method="custom", abits=4, promote_budget=-1)


def test_a_resumed_run_keeps_the_promotion_it_chose(tmp_path):
    saved = Checkpoint(tmp_path / "partial", {"run": 1})
    saved.open()
    promotion = Promotion("flips", 10.0, {"blocks.0.q_proj": 1.5, "blocks.0.k_proj": -0.25}, ("blocks.0.q_proj",), 0.5)
    saved.save_promotion(promotion)
    done, _, _ = saved.load_done(QuantConfig(method="custom", abits=4, promote_budget=10))
    assert done.promotion == promotion
