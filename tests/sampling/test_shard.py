"""Stage I's teacher runs and parity sharded over two gloo processes give exactly what one process gives."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

# Runs the teacher's recorded runs and parity of a tiny LLaDA against its fake-quant student on 7 prompts
# (batches of 2: four batches, an uneven split), in however many processes torch.distributed was given.
CHILD = """
import json, os, sys, torch
import torch.distributed as dist
from faircalib.calib.config import preset
from faircalib.calib.runner import quantize
from faircalib.models.tiny import tiny_denoiser
from faircalib.sampling import LLaDASampling, record_runs
from faircalib.sampling.parity import evaluate_parity

if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
torch.manual_seed(0)
torch.set_num_threads(1)
teacher = tiny_denoiser("llada", seed=1)
sampling = LLaDASampling(gen_length=8, block_length=4, steps=8)
prompts = [[3 + i, 4, 5 + i % 3][: 2 + i % 2] for i in range(7)]
runs = record_runs(teacher, prompts, sampling, teacher.spec, batch_size=2)
student = quantize(teacher, preset("rtn", abits=8), prompts[:2], sampling).apply(tiny_denoiser("llada", seed=1))
summary = evaluate_parity(student, runs, sampling, teacher.spec, post_commit_probes=2).summary()
tokens = [r.tokens.tolist() for _, r in runs]
confidence = [[s.confidence.tolist() for s in r.trajectory.steps] for _, r in runs]
if not dist.is_initialized() or dist.get_rank() == 0:
    print(json.dumps({"summary": summary, "tokens": tokens, "confidence": confidence}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world: int) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]  # fmt: skip
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    return json.loads(outputs[0][0])


@pytest.mark.slow
def test_two_gloo_processes_give_what_one_gives():
    one, two = run(1), run(2)
    assert two["tokens"] == one["tokens"] and two["confidence"] == one["confidence"]
    assert two["summary"] == one["summary"]
    assert one["summary"]["prompts"] == 7


@pytest.mark.slow
def test_calibrate_and_parity_under_torchrun_match_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m faircalib ...`: the same GPTQ student (Stage I's two batches of teacher
    runs shared) and the same report, printed once, as one process."""
    from safetensors.torch import load_file

    from faircalib.zoo import model_dir

    model = str(model_dir("llada-sudoku-tiny"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    calibrate = ["calibrate", "--model", model, "--method", "gptq", "--n-prompts", "20", "--device", "cpu", "--quiet"]
    subprocess.run([sys.executable, "-m", "faircalib", *calibrate, "--out", str(tmp_path / "one")], check=True)
    subprocess.run([*launcher, str(free_port()), "-m", "faircalib", *calibrate, "--out", str(tmp_path / "two")],
                   check=True)  # fmt: skip
    one, two = load_file(tmp_path / "one" / "tensors.safetensors"), load_file(tmp_path / "two" / "tensors.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    parity = ["parity", "--model", model, "--artifact", str(tmp_path / "one"), "--n-prompts", "8", "--batch-size",
              "2", "--json", "--quiet", "--device", "cpu"]  # fmt: skip
    alone = subprocess.run([sys.executable, "-m", "faircalib", *parity], capture_output=True, text=True, check=True)
    shared = subprocess.run([*launcher, str(free_port()), "-m", "faircalib", *parity], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert json.loads(shared.stdout) == json.loads(alone.stdout)
