"""A block's forward over calibration states in slices: the same result as the whole chunk."""

import torch

from faircalib.calib.forward import run_block_sliced, states_per_slice
from faircalib.models import load_denoiser


def test_block_forward_in_slices_matches_the_whole_chunk(tiny_dirs):
    model = load_denoiser(tiny_dirs["llada"])
    block = model.blocks[0]
    hidden = torch.randn(10, 7, 64, generator=torch.Generator().manual_seed(0))
    ctx = model.block_context(torch.zeros(10, 7, dtype=torch.long))
    widest = 192  # the tiny FFN
    one_state = 4 * 7 * widest
    assert states_per_slice(model, block, 7, slice_bytes=3 * one_state) == 3
    assert states_per_slice(model, block, 7, slice_bytes=1) == 1
    whole = model.run_block(block, hidden, ctx)
    for slice_bytes in (one_state, 3 * one_state, 2**28):
        torch.testing.assert_close(run_block_sliced(model, block, hidden, ctx, slice_bytes), whole)


def test_the_bundled_model_runs_its_calibration_chunks_whole():
    """So its calibrations (docs/RESULTS.md) take the very products an unsliced forward takes."""
    from faircalib.zoo import model_dir

    model = load_denoiser(model_dir())
    assert states_per_slice(model, model.blocks[0], 16 + 32) >= 32 * 32  # 32 prompts x 32 states, 48 tokens
