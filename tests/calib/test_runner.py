"""End-to-end calibration on the tiny checkpoints: resume after an interruption, mismatches, every family."""

import copy
import json

import pytest
import torch

import faircalib.calib.stage2 as stage2
from faircalib.calib.block_transforms import BLOCK_TRANSFORM_KEYS
from faircalib.calib.learned_rotation import ROTATION_KEY
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from tests.calib.helpers import PROMPTS, SAMPLING, run_calibration, small


@pytest.mark.parametrize(
    "cfg", [small("fair"), small("fair", abits=4, rotation_steps=4)], ids=["w4a16", "w4a4-learned"]
)
def test_interrupted_run_resumes_from_the_last_finished_block(tmp_path, tiny_dirs, monkeypatch, cfg):
    whole = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "whole")

    real = stage2.gptq_quantize
    calls = {"n": 0}

    def dies_in_block_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > len([n for g in load_denoiser(tiny_dirs["llada"]).linear_groups() for n in g]):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2, "gptq_quantize", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert len(list((tmp_path / "art.partial").glob("block_*.safetensors"))) == 1

    monkeypatch.setattr(stage2, "gptq_quantize", real)
    monkeypatch.setattr(stage2, "learn_rotation", None)  # a resumed run reuses the checkpointed rotation
    resumed = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "art")
    for key, layer in whole.layers.items():
        assert torch.equal(resumed.layers[key].weight.codes, layer.weight.codes), key
    for key in (ROTATION_KEY, *BLOCK_TRANSFORM_KEYS) if cfg.rotation_steps else ():
        assert torch.equal(resumed.fp_params[key], whole.fp_params[key]), key
    assert len(resumed.manifest["blocks"]) == 2
    block_seconds = sum(block["seconds"] for block in resumed.manifest["blocks"])
    assert resumed.manifest["timings"]["stage2_seconds"] >= block_seconds  # the interrupted run's time counts


def test_resume_with_different_arguments_is_refused(tmp_path, tiny_dirs):
    (tmp_path / "art.partial").mkdir()
    (tmp_path / "art.partial" / "progress.json").write_text(json.dumps({"identity": {"config": "other"}}))
    with pytest.raises(ConfigError, match="interrupted run of another"):
        run_calibration(tiny_dirs["llada"], small("rtn"), SAMPLING, PROMPTS, tmp_path / "art")


def test_text_method_needs_text(tmp_path, tiny_dirs):
    with pytest.raises(ConfigError, match="calibrates on plain text"):
        run_calibration(tiny_dirs["llada"], small("gptq-text"), SAMPLING, PROMPTS, tmp_path / "art")


@pytest.mark.parametrize("family", ["dream", "bert"])
def test_other_families_calibrate(tmp_path, tiny_dirs, family):
    from faircalib.sampling import DreamSampling

    sampling = DreamSampling(gen_length=8, steps=4, alg="maskgit_plus") if family == "dream" else SAMPLING
    prompts = torch.randint(5, 25, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = small("fair", reconstruct=True)  # the reconstruction too, on every family
    art = run_calibration(tiny_dirs[family], cfg, sampling, prompts, tmp_path / "art")
    model = load_denoiser(tiny_dirs[family])
    teacher = copy.deepcopy(model)
    art.apply(model)
    ids = torch.tensor([prompts[0] + [model.spec.mask_token_id] * 4])
    assert model(ids).shape == teacher(ids).shape
    # the host peak, also as a share of the checkpoint (the tiny one's is mostly the imports)
    manifest = art.manifest
    weights = sum(path.stat().st_size for path in tiny_dirs[family].glob("*.safetensors"))
    assert manifest["host_peak_over_checkpoint"] == pytest.approx(manifest["host_peak_mb"] * 2**20 / weights)
    assert manifest["host_peak_mb"] > weights / 2**20
