import json

import pytest
import torch
from safetensors import safe_open

from faircalib.errors import CheckpointError
from faircalib.models import Dream, HFMaskedLM, LLaDA, load_denoiser, parse_dtype
from faircalib.models.tiny import write_tiny_checkpoint

FAMILIES = ("llada", "dream", "bert")
IDS = torch.tensor([[5, 9, 17, 3, 8, 11, 2, 4], [7, 7, 1, 20, 6, 12, 13, 14]])


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_single_file_give_identical_logits(tmp_path, family):
    single = write_tiny_checkpoint(family, tmp_path / "single", seed=3)
    sharded = write_tiny_checkpoint(family, tmp_path / "sharded", seed=3, max_shard_bytes=40_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    a, b = load_denoiser(single), load_denoiser(sharded)
    assert torch.equal(a(IDS), b(IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_checkpoint_layout(tmp_path, tiny_dirs, family):
    model = load_denoiser(tiny_dirs[family])
    model.save_pretrained(tmp_path / "again")
    again = load_denoiser(tmp_path / "again")
    assert type(again) is type(model)
    assert again.spec == model.spec
    assert torch.equal(model(IDS), again(IDS))


def test_llada_uses_official_key_and_config_names(tiny_dirs):
    path = tiny_dirs["llada"]
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    for name in ("wte", "ln_f", "ff_out"):
        assert f"model.transformer.{name}.weight" in keys
    for name in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
        assert f"model.transformer.blocks.1.{name}.weight" in keys
    config = json.loads((path / "config.json").read_text())
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "mask_token_id", "rope_theta"):
        assert field in config
    assert config["architectures"] == ["LLaDAModelLM"]


def test_dream_uses_official_key_names(tiny_dirs):
    with safe_open(str(tiny_dirs["dream"] / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.weight"):
        assert f"model.layers.0.self_attn.{name}" in keys
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{name}.weight" in keys


def test_family_detection_and_spec(tiny_dirs):
    llada, dream, bert = (load_denoiser(tiny_dirs[f]) for f in FAMILIES)
    assert isinstance(llada, LLaDA) and not llada.spec.logit_shift
    assert isinstance(dream, Dream) and dream.spec.logit_shift and dream.spec.sampler == "dream"
    assert isinstance(bert, HFMaskedLM) and bert.spec.mask_token_id == 4  # [MASK] in the tiny vocab


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_path_equals_forward(tiny_dirs, family):
    """Calibration streams embed -> run_block -> head; it must be the same function as forward."""
    model = load_denoiser(tiny_dirs[family])
    hidden = model.embed(IDS)
    ctx = model.block_context(IDS)
    for block in model.blocks:
        hidden = model.run_block(block, hidden, ctx)
    assert torch.equal(model.head(hidden), model(IDS))
    for group in model.linear_groups():
        for name in group:
            assert isinstance(model.blocks[0].get_submodule(name), torch.nn.Linear)


def test_llada_block_matches_reference_formula(tiny_dirs):
    """h = x + attn_out(Attn(RoPE(q, k), v)); y = h + ff_out(silu(ff_proj(n(h))) * up_proj(n(h)))."""
    model = load_denoiser(tiny_dirs["llada"])
    block, cfg = model.blocks[0], model.config
    x = torch.randn(1, 6, cfg.d_model)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rope(t):  # [B, H, L, Dh], Llama half rotation
        dh = t.shape[-1]
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        ang = torch.outer(torch.arange(t.shape[2]).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        return t * cos + torch.cat([-t[..., dh // 2 :], t[..., : dh // 2]], -1) * sin

    def heads(t):
        return t.view(1, 6, cfg.n_heads, -1).transpose(1, 2)

    h = rms(x, block.attn_norm.weight)
    q, k, v = heads(block.q_proj(h)), heads(block.k_proj(h)), heads(block.v_proj(h))
    att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / cfg.head_dim**0.5, -1) @ v
    h = x + block.attn_out(att.transpose(1, 2).reshape(1, 6, -1))
    n = rms(h, block.ff_norm.weight)
    want = h + block.ff_out(torch.nn.functional.silu(block.ff_proj(n)) * block.up_proj(n))
    got = block(x, model.block_context(torch.zeros(1, 6, dtype=torch.long)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_load_in_low_precision(tiny_dirs, dtype):
    model = load_denoiser(tiny_dirs["llada"], parse_dtype(dtype))
    assert model.dtype == parse_dtype(dtype)
    full = load_denoiser(tiny_dirs["llada"])
    agree = (model(IDS).float().argmax(-1) == full(IDS).argmax(-1)).float().mean()
    assert agree > 0.9


def test_llada_embedding_larger_than_vocab_uses_weight_shape(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["embedding_size"] = config["vocab_size"] = 64  # the tensor has 96 rows, like the padded 8B one
    (path / "config.json").write_text(json.dumps(config))
    model = load_denoiser(path)
    assert model.spec.vocab_size == 96


# --- bad input: one clear error naming the problem --------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_denoiser(tmp_path / "absent")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_denoiser(tmp_path)


def test_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="unknown model family.*gpt2"):
        load_denoiser(tmp_path)


def test_config_missing_field(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["d_model"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing the field 'd_model'"):
        load_denoiser(path)


def _rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(tmp_path):
    path = write_tiny_checkpoint("dream", tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_denoiser(path)


def test_misshaped_tensor(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m")
    key = "model.transformer.blocks.0.q_proj.weight"
    _rewrite_tensors(path, lambda t: t.__setitem__(key, t[key][:, :10].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{key}.*shape \(64, 10\).*\(64, 64\)"):
        load_denoiser(path)


def test_truncated_weights_file(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_denoiser(path)


def test_index_points_at_missing_shard(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m", max_shard_bytes=40_000)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"points at {victim.name}, which is missing"):
        load_denoiser(path)


def test_no_weights_at_all(tmp_path):
    path = write_tiny_checkpoint("llada", tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_denoiser(path)


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_denoiser(tmp_path)


def test_tokenizer_naming_a_custom_class_loads_without_remote_code(tmp_path, tiny_dirs):
    """Dream's tokenizer_config.json names a custom class; we never run remote code."""
    import shutil

    from faircalib.models import load_tokenizer

    shutil.copytree(tiny_dirs["bert"], tmp_path / "m")
    config_path = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    )
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path / "m")
    assert tokenizer("A B")["input_ids"][1:3] == [5, 6]


def test_broken_tokenizer_is_a_clear_error(tmp_path):
    from faircalib.models import load_tokenizer

    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
