"""A calibration killed (SIGKILL: no cleanup runs) at any point, then run again with the same arguments, writes
the very artifact an uninterrupted run writes, and leaves nothing half-written behind."""

import json
import os
import signal
import subprocess
import sys

import pytest

from faircalib.api import calibrate_to
from faircalib.calib.config import preset
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling

pytestmark = pytest.mark.slow

SAMPLING = LLaDASampling(gen_length=8, block_length=4, steps=8)
PROMPTS = [[3 + (7 * i + j) % 80 for j in range(5)] for i in range(6)]
# W4A4 FAIR-Calib: Stage I, the learned rotation and block transforms, GPTQ and the reconstruction all run
CONFIG = dict(abits=4, n_prompts=6, states_per_prompt=3, rotation_steps=4, recon_steps=3, recon_batch=4)

CHILD = f"""
import importlib, os, signal, sys, torch
torch.set_num_threads(1)
model_dir, out, target, n, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
module_name, attr = target.split(":")
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]

def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] != n:
        return original(*args, **kwargs)
    if mode == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if mode == "torn":  # the file written is cut in half, as a kill during the write would leave it
        with open(args[1], "r+b") as handle:
            handle.truncate(os.path.getsize(args[1]) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(owner, name, killing)
from faircalib.api import calibrate_to
from faircalib.calib.config import preset
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling
calibrate_to(out, load_denoiser(model_dir), preset("fair", **{CONFIG}), {PROMPTS},
             LLaDASampling(gen_length=8, block_length=4, steps=8))
sys.exit(3)  # the kill point was never reached
"""

KILL_POINTS = [  # (where, which call, how)
    ("faircalib.models.llada:LLaDA.forward", 5, "before"),  # Stage I, mid-trajectory
    ("faircalib.calib.checkpoint:save_file", 1, "torn"),  # writing Stage I's states
    ("faircalib.calib.learned_rotation:_rotated_kl", 3, "before"),  # learning the rotation
    ("faircalib.calib.checkpoint:save_file", 2, "torn"),  # writing the learned rotation
    ("faircalib.calib.stage2:gptq_quantize", 2, "before"),  # inside block 0, between two linears
    ("faircalib.calib.reconstruction:_Objective.minibatch", 2, "before"),  # block 0's reconstruction
    ("faircalib.calib.checkpoint:save_file", 3, "torn"),  # writing block 0
    ("faircalib.calib.stage2:gptq_quantize", 8, "before"),  # inside block 1, block 0 finished
    ("faircalib.calib.artifact:save_file", 1, "torn"),  # writing the artifact
    ("faircalib.files:replace_dir", 1, "before"),  # the artifact staged, not yet renamed into place
    ("faircalib.calib.artifact:QuantArtifact.save", 1, "after"),  # saved, the resume directory not yet removed
]


def artifact_files(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("timings", "peak_memory_mb", "gpu_peak_mb_by_stage", "host_peak_mb", "host_peak_over_checkpoint"):
        manifest.pop(key)
    for block in manifest["blocks"]:
        block.pop("seconds")
    return (path / "tensors.safetensors").read_bytes(), manifest


@pytest.fixture(scope="module")
def uninterrupted(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "art"
    calibrate_to(out, load_denoiser(tiny_dirs["llada"]), preset("fair", **CONFIG), PROMPTS, SAMPLING)
    return artifact_files(out)


@pytest.mark.parametrize("where,call,how", KILL_POINTS, ids=[f"{w.split(':')[1]}-{c}-{h}" for w, c, h in KILL_POINTS])
def test_a_killed_calibration_resumes_to_the_same_artifact(tiny_dirs, tmp_path, uninterrupted, where, call, how):
    out = tmp_path / "art"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_dirs["llada"]), str(out), where, str(call), how],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "art.partial").is_dir()
    calibrate_to(out, load_denoiser(tiny_dirs["llada"]), preset("fair", **CONFIG), PROMPTS, SAMPLING)
    assert artifact_files(out) == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no resume directory, no staging left
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tensors.safetensors"]
