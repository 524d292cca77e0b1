"""GGUF export: the artifact's codes and scales go in exactly, and what GGUF cannot express is refused."""

import copy

import gguf
import numpy as np
import pytest
import torch

from faircalib.api import calibrate_to, export
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import QuantConfig, preset
from faircalib.errors import ConfigError
from faircalib.exporter.gguf_export import pack_q4_0, pack_q8_0, rope_pairs
from faircalib.exporter.profiles import profile
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling

SAMPLING = LLaDASampling(gen_length=8, block_length=4, steps=8)
PROMPTS = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()


def gguf_config(method="fair", target="gguf-q4_0", **overrides):
    fields = profile(target).calibration_fields([64, 192])
    return preset(method, **{**fields, "n_prompts": 4, "states_per_prompt": 2, "recon_steps": 2, **overrides})


@pytest.fixture(scope="module", params=["gguf-q4_0", "gguf-q8_0"])
def bundle(request, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = load_denoiser(tiny_dirs["llada"])
    artifact = calibrate_to(root / "art", copy.deepcopy(model), gguf_config("gptq", request.param), PROMPTS,
                            SAMPLING)  # fmt: skip
    export(model, artifact, request.param, root / "bundle")
    return root, request.param


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_what_gguf_dequantizes(bits):
    g = torch.Generator().manual_seed(0)
    low, high = (-8, 8) if bits == 4 else (-128, 128)
    codes = torch.randint(low, high, (6, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(6, 2, generator=g).half().float()
    packed = pack_q4_0(codes, scale) if bits == 4 else pack_q8_0(codes, scale)
    kind = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    expected = codes.float() * scale.repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(gguf.quants.dequantize(packed, kind), expected.numpy())


def stored_as_the_artifact(artifact: QuantArtifact, path) -> dict:
    """Check that every quantized linear of the GGUF file is its artifact layer's codes and scales, as Q4_0 or
    Q8_0 by the layer's own bits; returns the file's tensors by name."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "attn_out": "attn_output",
             "ff_proj": "ffn_gate", "up_proj": "ffn_up", "ff_out": "ffn_down"}  # fmt: skip
    heads = {"q_proj": 4, "k_proj": 4}  # the tiny LLaDA's query and key-value heads: their rows are reordered
    for key, layer in artifact.layers.items():
        _, block, linear = key.split(".")
        stored = tensors[f"blk.{block}.{names[linear]}.weight"]
        kind = gguf.GGMLQuantizationType.Q4_0 if layer.weight.spec.bits == 4 else gguf.GGMLQuantizationType.Q8_0
        assert stored.tensor_type == kind, key
        values = gguf.quants.dequantize(np.asarray(stored.data), kind)
        expected = (layer.weight.codes.float() * layer.weight.scale.repeat_interleave(32, dim=1)).numpy()
        if linear in heads:
            expected = rope_pairs(expected, heads[linear])
        np.testing.assert_array_equal(values, expected)
    return tensors


def test_reading_the_file_back_gives_the_artifacts_codes_and_scales(bundle, tiny_dirs):
    root, name = bundle
    artifact = QuantArtifact.load(root / "art")
    assert {layer.weight.spec.bits for layer in artifact.layers.values()} == {4 if name == "gguf-q4_0" else 8}
    tensors = stored_as_the_artifact(artifact, root / "bundle" / "model.gguf")
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert sorted(p.name for p in (root / "bundle").iterdir()) == ["manifest.json", "model.gguf", "schedule.json"]


def test_promoted_linears_are_q8_0_tensors_beside_q4_0_ones(tiny_dirs, tmp_path):
    model = load_denoiser(tiny_dirs["llada"])
    cfg = gguf_config("gptq", promote_budget=30, promote_by="hessian")
    artifact = calibrate_to(tmp_path / "art", copy.deepcopy(model), cfg, PROMPTS, SAMPLING)
    export(model, artifact, "gguf-q4_0", tmp_path / "bundle")
    assert {layer.weight.spec.bits for layer in artifact.layers.values()} == {4, 8}
    stored_as_the_artifact(artifact, tmp_path / "bundle" / "model.gguf")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(group_size=64), "group size 64 (it takes blocks of 32 along K)"),
        (dict(w_symmetric=False), "asymmetric weights"),
        (dict(abits=4, a_group_size=None), "4-bit activations"),
        (dict(a_group_size=None), "per-token activation scales (it takes per-block (32 inputs))"),
        (dict(w_fp16_scales=False), "float32 weight scales"),
        (dict(rotate=True), "online Hadamard"),
    ],
)
def test_what_gguf_cannot_express_is_refused(tiny_dirs, tmp_path, overrides, message):
    cfg = QuantConfig(**{**gguf_config("gptq").to_json_dict(), "method": "custom", **overrides})
    model = load_denoiser(tiny_dirs["llada"])
    artifact = calibrate_to(tmp_path / "art", copy.deepcopy(model), cfg, PROMPTS, SAMPLING)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(model, artifact, "gguf-q4_0", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_families_llama_cpp_cannot_load_and_onnx_profiles_are_refused(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="llama.cpp has no loader for hf_mlm models"):
        export(load_denoiser(tiny_dirs["bert"]), None, "gguf-f16", tmp_path / "a")
    from faircalib.exporter.gguf_export import export_gguf

    with pytest.raises(ConfigError, match="exports ONNX, not GGUF"):
        export_gguf(load_denoiser(tiny_dirs["llada"]), None, "ort-fp32", tmp_path / "b")


def test_targets_calibrate_what_gguf_takes():
    cfg = gguf_config("fair")
    assert (cfg.wbits, cfg.abits, cfg.group_size, cfg.a_group_size, cfg.w_fp16_scales, cfg.rotate) == (
        4, 8, 32, 32, True, False,
    )  # fmt: skip
    assert not profile("gguf-q4_0").problems(cfg) and profile("gguf-q8_0").problems(cfg)
