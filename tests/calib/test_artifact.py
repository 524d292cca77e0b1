"""The artifact of a calibration on a tiny LLaDA: round trip, packed codes, model check, atomic writes, formats."""

import json

import pytest
import torch

import faircalib.calib.artifact as artifact_module
from faircalib.calib.artifact import QuantArtifact, model_fingerprint
from faircalib.calib.block_transforms import BLOCK_TRANSFORM_KEYS
from faircalib.calib.learned_rotation import ROTATION_KEY
from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import load_denoiser
from faircalib.models.tiny import write_tiny_checkpoint
from tests.calib.helpers import IDS, PROMPTS, SAMPLING, run_calibration, small


@pytest.mark.parametrize(
    "cfg",
    [
        small("fair"),
        small("gptq", abits=8, group_size=16),
        small("rtn", wbits=8, w_symmetric=False),
        small("quarot", abits=4),
        small("fair", abits=4, rotation_steps=4, block_transforms=False),
        small("fair", abits=4, rotation_steps=4),  # block transforms too, by default
        small("smoothquant", wbits=8, abits=8),
        small("gptq-recon", wbits=8, abits=8, a_static=True),
    ],
    ids=[
        "fair-w4a16",
        "gptq-w4a8-g16",
        "rtn-w8-asym",
        "quarot-w4a4",
        "fair-w4a4-rotated",
        "fair-w4a4-block-transforms",
        "smoothquant-w8a8",
        "gptq-recon-w8a8-static",
    ],  # fmt: skip
)
def test_artifact_round_trip_reproduces_the_student(tmp_path, tiny_dirs, cfg):
    art = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "art")
    loaded = QuantArtifact.load(tmp_path / "art")
    assert loaded.config == cfg and loaded.manifest["model"]["fingerprint"] == model_fingerprint(tiny_dirs["llada"])
    assert set(loaded.layers) == set(art.layers)
    for key, layer in art.layers.items():
        assert torch.equal(loaded.layers[key].weight.codes, layer.weight.codes.cpu())
        assert torch.equal(loaded.layers[key].weight.scale, layer.weight.scale.cpu())
    student = loaded.apply(load_denoiser(tiny_dirs["llada"]))
    again = art.apply(load_denoiser(tiny_dirs["llada"]))
    assert torch.equal(student(IDS), again(IDS))
    assert not torch.equal(student(IDS), load_denoiser(tiny_dirs["llada"])(IDS))  # it really is quantized
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["format"] == cfg.format and manifest["timings"]["stage2_seconds"] > 0
    assert len(manifest["blocks"]) == 2 and not (tmp_path / "art.partial").exists()
    if cfg.weighting == "prior":
        assert loaded.prior is not None and loaded.prior.shape == (8,)
    # smoothed norm scales, a learned rotation and learned block transforms travel along
    assert (ROTATION_KEY in loaded.fp_params) == (cfg.rotation_steps > 0)
    assert all((key in loaded.fp_params) == cfg.block_transforms for key in BLOCK_TRANSFORM_KEYS)
    assert any(k.endswith("norm.weight") for k in loaded.fp_params) == cfg.smooth
    # static activation scales: one calibrated peak per layer, and the student quantizes with it
    peaks = {key: layer.act.static_amax for key, layer in loaded.layers.items() if layer.act.static_amax is not None}
    assert set(peaks) == (set(art.layers) if cfg.a_static else set())
    assert all(peak > 0 for peak in peaks.values())
    layer = student.blocks[0].get_submodule(student.linear_groups()[0][0])
    assert (layer.act.static_amax is not None) == cfg.a_static


def test_four_bit_codes_are_stored_packed(tmp_path, tiny_dirs):
    run_calibration(tiny_dirs["llada"], small("rtn"), SAMPLING, PROMPTS, tmp_path / "art")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "art" / "tensors.safetensors"), "pt") as handle:
        codes = handle.get_tensor("blocks.0.q_proj.codes")
    assert codes.dtype == torch.uint8 and codes.shape == (64, 32)


def test_artifact_for_another_model_is_rejected(tmp_path, tiny_dirs):
    run_calibration(tiny_dirs["llada"], small("rtn"), SAMPLING, PROMPTS, tmp_path / "art")
    other = write_tiny_checkpoint("llada", tmp_path / "other", seed=9)
    (other / "config.json").write_text(
        (other / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": 20000.0')
    )
    with pytest.raises(ConfigError, match="calibrated for"):
        QuantArtifact.load(tmp_path / "art").check_model(other)
    QuantArtifact.load(tmp_path / "art").check_model(tiny_dirs["llada"])  # its own model is fine


def test_failed_save_leaves_no_artifact(tmp_path, tiny_dirs, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        run_calibration(tiny_dirs["llada"], small("rtn"), SAMPLING, PROMPTS, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art.partial"]  # progress survives for a resume


def test_not_an_artifact(tmp_path):
    with pytest.raises(CheckpointError, match="is not a faircalib artifact"):
        QuantArtifact.load(tmp_path)


def test_artifacts_of_other_formats_are_refused(tmp_path, tiny_dirs):
    """Only this format loads: an older artifact (format 3 kept activation clips and peaks apart from the
    layers) is to be calibrated again, a newer one needs a newer faircalib."""
    run_calibration(tiny_dirs["llada"], small("rtn"), SAMPLING, PROMPTS, tmp_path / "art")
    assert QuantArtifact.load(tmp_path / "art").layers
    manifest_path = tmp_path / "art" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for version, message in ((3, "format 3.*calibrate again"), (99, "artifact of format 99")):
        manifest_path.write_text(json.dumps({**manifest, "format_version": version}))
        with pytest.raises(CheckpointError, match=message):
            QuantArtifact.load(tmp_path / "art")
