"""SmoothQuant's migration between each norm and its readers: the function is kept, peaks flatten."""

import pytest
import torch

from faircalib.calib.smoothquant import norm_output_absmax, smooth_block
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from faircalib.models.tiny import tiny_denoiser

IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def test_smoothquant_preserves_the_function_and_flattens_activation_peaks():
    model = tiny_denoiser("llada", seed=4)
    with torch.no_grad():
        model.blocks[0].attn_norm.weight[3] = 25.0  # a loud channel after the norm
    hidden = [model.embed(IDS)]
    contexts = [model.block_context(IDS)]
    before_out = model(IDS)
    peaks = norm_output_absmax(model, model.blocks[0], ["attn_norm"], hidden, contexts)["attn_norm"]
    changed = smooth_block(model, model.blocks[0], hidden, contexts, alpha=0.5)
    torch.testing.assert_close(model(IDS), before_out, rtol=1e-4, atol=1e-4)
    after = norm_output_absmax(model, model.blocks[0], ["attn_norm"], hidden, contexts)["attn_norm"]
    assert float(after.max() / after.median()) < float(peaks.max() / peaks.median()) / 2
    assert set(changed) == {"attn_norm.weight", "ff_norm.weight"}


def test_smoothquant_refuses_post_ln(tiny_dirs):
    model = load_denoiser(tiny_dirs["bert"])
    with pytest.raises(ConfigError, match="SmoothQuant needs pre-norm"):
        smooth_block(model, model.blocks[0], [model.embed(IDS[:, :5])], [model.block_context(IDS)], alpha=0.5)
