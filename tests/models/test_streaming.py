"""Blocks streamed from host memory: the same computation, a block on the device only while it runs."""

import json

import pytest
import torch

from faircalib.api import calibrate_to
from faircalib.calib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from faircalib.models.streaming import HOST, is_streamed, resident
from tests.calib.helpers import PROMPTS, SAMPLING, run_calibration

IDS = torch.tensor([[5, 9, 17, 95, 95, 95, 11, 4]])


def test_a_streamed_forward_computes_what_the_resident_model_does(tiny_dirs):
    resident_model = load_denoiser(tiny_dirs["llada"])
    model = load_denoiser(tiny_dirs["llada"], stream_blocks=True)
    assert is_streamed(model) and not is_streamed(resident_model)
    before = [id(p) for p in model.blocks[0].parameters()]
    assert torch.equal(model(IDS), resident_model(IDS))
    # each call gave the block new parameter objects and took them back: what a GPU run does, without copies
    assert [id(p) for p in model.blocks[0].parameters()] != before
    assert all(p.device == HOST for p in model.blocks[0].parameters())
    with resident(model.blocks[0]):
        kept = [id(p) for p in model.blocks[0].parameters()]
        model(IDS)
        assert [id(p) for p in model.blocks[0].parameters()] == kept


def test_a_streamed_calibration_makes_the_resident_ones_artifact(tiny_dirs, tmp_path):
    """FAIR-Calib W4A4 with everything that runs the whole model (Stage I, the learned rotation and block
    transforms, flip-aware promotion) streaming, and Stage II learning in its own placed blocks."""
    cfg = QuantConfig(method="fair", abits=4, n_prompts=6, states_per_prompt=3, rotation_steps=4, recon_steps=3,
                      recon_batch=4, promote_budget=20, promote_states=8)  # fmt: skip
    plain = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "plain")
    model = load_denoiser(tiny_dirs["llada"], stream_blocks=True)
    streamed = calibrate_to(tmp_path / "streamed", model, cfg, PROMPTS, SAMPLING)
    assert streamed.manifest["promotion"]["promoted"] == plain.manifest["promotion"]["promoted"]
    for key, layer in plain.layers.items():
        assert torch.equal(streamed.layers[key].weight.codes, layer.weight.codes), key
        assert torch.equal(streamed.layers[key].weight.scale, layer.weight.scale), key
        assert streamed.layers[key].act == layer.act
    for key, value in plain.fp_params.items():
        assert torch.equal(streamed.fp_params[key], value), key
    assert any(report["recon"]["kept"] for report in streamed.manifest["blocks"])  # the reconstruction learned


def test_hessian_promotion_needs_resident_blocks(tiny_dirs, tmp_path):
    cfg = QuantConfig(method="gptq", abits=4, n_prompts=6, states_per_prompt=3, promote_budget=20, promote_by="hessian")
    model = load_denoiser(tiny_dirs["llada"], stream_blocks=True)
    with pytest.raises(ConfigError, match="drop --stream-blocks"):
        calibrate_to(tmp_path / "art", model, cfg, PROMPTS, SAMPLING)


@pytest.mark.parametrize("family", ["llada", "dream", "bert"])
def test_generate_with_streamed_blocks_writes_the_same_tokens(capsys, tiny_dirs, family):
    from faircalib.cli import main

    outputs = []
    for flags in ([], ["--stream-blocks"]):
        assert main(["generate", "--model", str(tiny_dirs[family]), "--prompt-ids", "5,6,7", "--gen-length", "8",
                     "--steps", "8", "--json", "--quiet", *flags]) == 0  # fmt: skip
        outputs.append(json.loads(capsys.readouterr().out)["generated_ids"])
    assert outputs[0] == outputs[1]
