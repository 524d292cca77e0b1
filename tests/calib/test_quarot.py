"""QuaRot's rotation of the residual stream: the function is kept, outliers are spread, post-LN is refused."""

import pytest
import torch

from faircalib.calib.learned_rotation import skew_rotation
from faircalib.calib.quarot import fold_rotation, rotate_model
from faircalib.errors import ConfigError
from faircalib.kernels.hadamard import OnlineHadamard
from faircalib.models import load_denoiser
from faircalib.models.tiny import tiny_denoiser

IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rotation_preserves_the_function(family):
    model = tiny_denoiser(family, seed=4)
    before = model(IDS)
    rotate_model(model, seed=1)
    torch.testing.assert_close(model(IDS), before, rtol=1e-4, atol=1e-4)
    assert type(model.blocks[0].get_submodule(model.rotation_layout().ffn_down_input)) is OnlineHadamard


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_second_rotation_folds_without_changing_the_function(family):
    model = tiny_denoiser(family, seed=4)
    before = model(IDS)
    layout = rotate_model(model, seed=1)
    dim = model.embed(IDS).shape[-1]
    fold_rotation(model, layout, skew_rotation(torch.randn(dim, dim, dtype=torch.float64)))
    torch.testing.assert_close(model(IDS), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="does not fit"):
        fold_rotation(model, layout, torch.eye(dim + 1, dtype=torch.float64))


def test_rotation_spreads_an_outlier_channel():
    model = tiny_denoiser("llada", seed=4)
    with torch.no_grad():
        model.model.transformer.wte.weight[:, 7] *= 30  # one loud residual channel
    seen = {}
    model.blocks[0].q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))

    def peak_to_rms():
        model(IDS)
        x = seen["x"]
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    plain = peak_to_rms()
    rotate_model(model, seed=0)
    assert peak_to_rms() < plain / 2


def test_post_ln_models_cannot_be_rotated(tiny_dirs):
    with pytest.raises(ConfigError, match="post-LN"):
        rotate_model(load_denoiser(tiny_dirs["bert"]), seed=0)
