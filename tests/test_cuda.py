"""The GPU path: calibration, the fake-quant student and parity with the model on CUDA. Skipped where there
is no GPU (CI); run on a lent H100 (docs/RESULTS.md, "On a GPU")."""

import copy
import json

import pytest
import torch

from faircalib.api import calibrate_to
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import preset
from faircalib.calib.probe import text_states
from faircalib.calib.stage2 import Events, calibrate
from faircalib.cli import main
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling
from faircalib.zoo import model_dir as bundled_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SAMPLING = LLaDASampling(gen_length=8, block_length=4, steps=8)
PROMPTS = torch.randint(3, 90, (6, 5), generator=torch.Generator().manual_seed(0)).tolist()
IDS = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(1))


def small(method, **kw):
    return preset(method, n_prompts=6, states_per_prompt=3, recon_steps=5, recon_batch=4, **kw)


@pytest.mark.parametrize(
    "cfg",
    [
        small("rtn"),
        small("gptq", abits=8),
        small("fair", abits=4, rotation_steps=0),
        small("fair", abits=4, rotation_steps=4),
    ],
    ids=["rtn-w4a16", "gptq-w4a8", "fair-w4a4-hadamard", "fair-w4a4-learned"],
)
def test_calibration_on_cuda_matches_the_cpu_one(tmp_path, tiny_dirs, cfg):
    """As good a student as on the CPU. Without a learned rotation, the same one up to float rounding: the two
    differ by far less than either differs from the full-precision model (RTN: the very same codes). Adam's
    first steps move every entry of a learned rotation by about its step size, in the direction of the sign
    of the gradient, and where a gradient is rounding noise that sign differs between devices: learned
    rotations are equally good, not equal."""
    model_dir = tiny_dirs["llada"]
    on_cpu = calibrate_to(tmp_path / "cpu", load_denoiser(model_dir), cfg, PROMPTS, SAMPLING)
    on_gpu = calibrate_to(tmp_path / "gpu", load_denoiser(model_dir, device="cuda"), cfg, PROMPTS, SAMPLING)
    peaks = on_gpu.manifest["gpu_peak_mb_by_stage"]
    assert set(peaks) == {"stage1", "whole_model", "blocks"}
    assert on_gpu.manifest["peak_memory_mb"] == max(peaks.values())
    loaded = QuantArtifact.load(tmp_path / "gpu")  # what a user reloads, on the CPU
    teacher = load_denoiser(model_dir)
    reference = teacher(IDS)
    student_cpu = on_cpu.apply(copy.deepcopy(teacher))(IDS)
    student_gpu = loaded.apply(copy.deepcopy(teacher))(IDS)
    error_cpu, error_gpu = (student_cpu - reference).norm(), (student_gpu - reference).norm()
    assert 0 < error_gpu < 1.25 * error_cpu, (float(error_gpu), float(error_cpu))
    if cfg.rotation_steps == 0:
        ratio = float((student_gpu - student_cpu).norm() / error_cpu)
        assert ratio < 0.2, ratio
    if cfg.method == "rtn":
        assert all(torch.equal(loaded.layers[k].weight.codes, layer.weight.codes) for k, layer in on_cpu.layers.items())


def test_stage_two_holds_one_block_on_the_gpu(tiny_dirs):
    """The blocks wait on the CPU: whenever a block runs, it is the only one on the GPU, and once it is done the
    weights the artifact will hold of it are on the CPU too."""
    model = load_denoiser(tiny_dirs["llada"], device="cuda")
    calib = text_states(torch.randint(3, 90, (6, 9), generator=torch.Generator().manual_seed(0)))

    def on_gpu() -> list[int]:
        tensors = lambda block: [*block.parameters(), *block.buffers()]  # noqa: E731
        return [i for i, block in enumerate(model.blocks) if any(t.is_cuda for t in tensors(block))]

    run_block, resident = model.run_block, []

    def spy(block, x, ctx):
        resident.append(on_gpu())
        assert resident[-1] == [next(i for i, b in enumerate(model.blocks) if b is block)]
        return run_block(block, x, ctx)

    def finished(report, mine):
        assert on_gpu() == []
        assert not any(
            layer.weight.codes.is_cuda
            for key, layer in mine.layers.items()
            if key.startswith(f"blocks.{report.index}.")
        )

    model.run_block = spy
    calibrate(
        model, calib, small("gptq-recon", abits=4, rotation_steps=0), offload="cpu", events=Events(block_done=finished)
    )
    assert sorted({tuple(r) for r in resident}) == [(i,) for i in range(len(model.blocks))]
    assert model.device.type == "cuda"  # the embedding stays


def test_cli_calibrate_and_parity_on_cuda(tmp_path, capsys):
    """The bundled model end to end with ``--device cuda``: the teacher's recorded states live on the GPU."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The history of the city\nIn mathematics, a group is\nThe river flows\nA famous painter\n")
    schedule = ["--gen-length", "8", "--block-length", "4", "--steps", "8"]
    art = tmp_path / "art"
    code = main([
        "calibrate", "--model", str(bundled_model()), "--device", "cuda", "--method", "fair", "--abits", "4",
        "--calib-prompts", str(prompts), "--n-prompts", "4", "--states-per-prompt", "2", "--rotation-steps", "4",
        "--recon-steps", "5", *schedule, "--quiet", "--out", str(art),
    ])  # fmt: skip
    assert code == 0 and (art / "manifest.json").is_file()
    capsys.readouterr()
    code = main([
        "parity", "--model", str(bundled_model()), "--device", "cuda", "--artifact", str(art),
        "--prompts", str(prompts), *schedule, "--json", "--quiet",
    ])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and 0 <= report["frontier_flip_rate"] <= 1 and report["teacher_commits"] == 4 * 8


def test_streamed_blocks_calibrate_what_resident_ones_do_holding_one_block(tmp_path):
    """The bundled model with its blocks in host memory: Stage I, the learned rotation and flip-aware promotion
    bring one block at a time to the GPU, and the artifact is the resident run's."""
    cfg = preset("fair", abits=4, n_prompts=6, states_per_prompt=4, rotation_steps=10, recon_steps=5,
                 promote_budget=10, promote_states=8)  # fmt: skip
    prompts = [[5 + i, 17, 23, 42] for i in range(6)]
    runs = {}
    for stream in (False, True):
        model = load_denoiser(bundled_model(), torch.float32, "cuda", stream_blocks=stream)
        torch.cuda.reset_peak_memory_stats()
        runs[stream] = calibrate_to(tmp_path / str(stream), model, cfg, prompts, SAMPLING)
    resident, streamed = runs[False], runs[True]
    assert streamed.manifest["promotion"]["promoted"] == resident.manifest["promotion"]["promoted"]
    agree = [torch.equal(streamed.layers[k].weight.codes, layer.weight.codes) for k, layer in resident.layers.items()]
    assert sum(agree) >= 0.9 * len(agree)  # GPU reductions need not repeat bit for bit across placements
    for stage in ("stage1", "whole_model"):
        assert streamed.manifest["gpu_peak_mb_by_stage"][stage] < resident.manifest["gpu_peak_mb_by_stage"][stage]
