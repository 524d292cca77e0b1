"""Stage II on a tiny LLaDA: static activation peaks, offloaded blocks, and the rotation's uniform weights."""

import pytest
import torch

import faircalib.calib.stage2 as stage2
from faircalib.calib.learned_rotation import LEARNED_KEYS
from faircalib.calib.probe import teacher_states, text_states
from faircalib.calib.stage2 import Events
from faircalib.models import load_denoiser
from faircalib.sampling import record_runs
from tests.calib.helpers import PROMPTS, SAMPLING, run_calibration, small


def test_static_activation_peak_is_the_largest_calibration_input(tmp_path, tiny_dirs):
    """The first block's first linear reads the normalised embeddings: its peak can be recomputed directly."""
    cfg = small("rtn", wbits=8, abits=8, a_static=True)
    art = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / "art")
    model = load_denoiser(tiny_dirs["llada"])
    name = model.linear_groups()[0][0]
    seen = []
    handle = model.blocks[0].get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    runs = record_runs(model, PROMPTS, SAMPLING, model.spec, device=model.device)
    states = teacher_states([run for _, run in runs], cfg, SAMPLING, model.spec.mask_token_id)
    with torch.no_grad():
        for chunk in states.chunks:
            model.run_block(model.blocks[0], model.embed(chunk.tokens), model.block_context(chunk.tokens))
    handle.remove()
    assert art.layers[f"blocks.0.{name}"].act.static_amax == pytest.approx(float(max(seen)), rel=1e-6)


def test_offloaded_blocks_reach_the_compute_device_one_at_a_time(tiny_dirs):
    """With ``offload``, a block comes to the compute device for its turn and goes back before the next one
    comes; no other block runs meanwhile. The student is the one calibrated without offloading."""
    cfg = small("gptq-recon", abits=4, rotation_steps=0)
    calib = text_states(torch.randint(3, 90, (6, 9), generator=torch.Generator().manual_seed(0)))
    reference = stage2.calibrate(load_denoiser(tiny_dirs["llada"]), calib, cfg)

    model = load_denoiser(tiny_dirs["llada"])
    index = {id(block): i for i, block in enumerate(model.blocks)}
    events = []

    def spy_moves(block):
        move = block.to
        block.to = lambda device: events.append(("to", index[id(block)], str(device))) or move(device)

    for block in model.blocks:
        spy_moves(block)
    run_block = model.run_block
    model.run_block = lambda block, x, ctx: events.append(("run", index[id(block)], None)) or run_block(block, x, ctx)
    streaming = lambda: events.append(("streaming", None, None))  # noqa: E731
    result = stage2.calibrate(model, calib, cfg, offload="cpu", events=Events(streaming=streaming))

    blocks = len(model.blocks)
    assert events[:blocks] == [("to", i, "cpu") for i in range(blocks)]  # all wait before the first block runs
    assert events[blocks] == ("streaming", None, None)
    moves = [(i, device) for kind, i, device in events[blocks + 1 :] if kind == "to"]
    assert moves == [(i, device) for i in range(blocks) for device in ("cpu", "cpu")]
    resident = None
    for kind, i, _ in events[blocks + 1 :]:
        if kind == "to":
            resident = i if resident is None else None
        else:
            assert resident == i, f"block {i} ran while block {resident} was on the compute device"
    assert resident is None
    for key, layer in reference.layers.items():
        assert torch.equal(result.layers[key].weight.codes, layer.weight.codes), key


def test_a_rotation_on_uniform_weights_is_the_uniform_twins(tmp_path, tiny_dirs):
    """The learned rotation keeps the prior's weights out: with the same rotation steps, FAIR-Calib learns the
    very rotation and block transforms its uniform twin learns."""
    learned = {}
    for name, method in (("twin", "gptq-recon"), ("fair", "fair")):
        cfg = small(method, abits=4, rotation_steps=4)
        art = run_calibration(tiny_dirs["llada"], cfg, SAMPLING, PROMPTS, tmp_path / name)
        learned[name] = {k: art.fp_params[k] for k in LEARNED_KEYS}
    assert all(torch.equal(learned["fair"][k], v) for k, v in learned["twin"].items())
