"""What the calib tests share: synthetic linear layers, and small calibrations of the tiny LLaDA."""

import torch

from faircalib.api import calibrate_to
from faircalib.calib.config import preset
from faircalib.calib.quant import WeightSpec
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling

SPECS = [
    WeightSpec(4, None, True),
    WeightSpec(4, 16, True),
    WeightSpec(4, 16, False),
    WeightSpec(8, None, False),
    WeightSpec(3, 32, True),
]


def layer(n=24, k=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # correlated inputs with uneven scales, as real activations have
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) * torch.linspace(0.2, 3.0, k)) @ mix
    return w, x


SAMPLING = LLaDASampling(gen_length=8, block_length=4, steps=8)
PROMPTS = torch.randint(3, 90, (6, 5), generator=torch.Generator().manual_seed(0)).tolist()
IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11]])


def small(method, **kw):
    return preset(method, n_prompts=6, states_per_prompt=3, recon_steps=5, recon_batch=4, **kw)


def run_calibration(model_dir, cfg, sampling, prompts, out, **kwargs):
    """A calibration of the checkpoint ``model_dir`` into the artifact directory ``out`` (OUT.partial while running)."""
    return calibrate_to(out, load_denoiser(model_dir), cfg, prompts, sampling, **kwargs)
