"""The fake-quant student of a calibration: refusals of learned transforms its config cannot hold."""

import pytest
import torch

from faircalib.calib.block_transforms import BLOCK_TRANSFORM_KEYS
from faircalib.calib.learned_rotation import ROTATION_KEY
from faircalib.calib.student import apply_quantization
from faircalib.errors import ConfigError
from faircalib.models import load_denoiser
from tests.calib.helpers import IDS, small


def test_block_transforms_without_a_learned_rotation_are_refused(tiny_dirs):
    cfg = small("fair", abits=4, rotation_steps=4, block_transforms=True)
    with pytest.raises(ConfigError, match="come with a learned rotation"):
        apply_quantization(load_denoiser(tiny_dirs["llada"]), cfg, {}, {BLOCK_TRANSFORM_KEYS[0]: torch.eye(2)})


def test_a_learned_rotation_in_an_unrotated_config_is_refused(tiny_dirs):
    cfg = small("gptq", abits=4)
    dim = load_denoiser(tiny_dirs["llada"]).embed(IDS).shape[-1]
    with pytest.raises(ConfigError, match="does not rotate"):
        apply_quantization(load_denoiser(tiny_dirs["llada"]), cfg, {}, {ROTATION_KEY: torch.eye(dim)})
