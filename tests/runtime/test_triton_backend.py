"""The Triton backend: each kernel-backed linear against the PyTorch QuantLinear it replaces, the swap on a
rotated student (online Hadamard fused), and the bundled model's decisions against the fake-quant student."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from faircalib.api import quantize
from faircalib.calib.config import preset
from faircalib.calib.linear import QuantizedLayer, QuantizedWeight, QuantLinear
from faircalib.calib.quant import ActSpec, WeightSpec, quantize_weight, weight_qparams
from faircalib.kernels.hadamard import OnlineHadamard
from faircalib.models import load_denoiser
from faircalib.runtime.triton_backend import KernelLinear, TritonBackend, swap_kernel_linears
from faircalib.sampling import LLaDASampling, record_runs
from faircalib.sampling.parity import decision_agreement
from faircalib.zoo import model_dir as bundled_model
from tests.calib.helpers import layer

SERVED = [  # (weight spec, activation spec)
    (WeightSpec(4), ActSpec(4)),
    (WeightSpec(4, 16), ActSpec(4, clip_ratio=0.9)),
    (WeightSpec(4, 16, symmetric=False), ActSpec(4, symmetric=False)),
    (WeightSpec(4), ActSpec(8)),
    (WeightSpec(8), ActSpec(8)),
    (WeightSpec(8), ActSpec(8, static_amax=6.0)),
    (WeightSpec(4, 16), ActSpec()),
    (WeightSpec(4, 32, symmetric=False), ActSpec()),
    (WeightSpec(8, None, symmetric=False), ActSpec()),
]


def quantized_layer(wspec, act, seed=0):
    w, x = layer(n=24, k=64, tokens=40, seed=seed)
    scale, zero = weight_qparams(w, wspec)
    return QuantizedLayer(QuantizedWeight(quantize_weight(w, scale, zero, wspec), scale, zero, wspec), act), x


@pytest.mark.parametrize("wspec,act", SERVED)
def test_kernel_linear_computes_what_quant_linear_does(wspec, act):
    q, x = quantized_layer(wspec, act)
    bias = torch.randn(24)
    reference, kernel = QuantLinear(q, bias, torch.float32), KernelLinear(q, bias)
    x = x.reshape(4, 10, 64)
    expected = reference(x)
    if act.enabled and act.static_amax is None and wspec.group_size is None:
        assert torch.equal(kernel(x), expected)  # integer sums, then the same float operations in the same order
    else:  # groups summed in another order; static scales: an integer GEMM where the reference dequantizes
        torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)
    assert kernel.packed == (wspec.bits == 4 and (wspec.symmetric or not act.enabled))


def test_kernel_linear_declines_what_the_kernels_cannot_hold():
    assert not KernelLinear.serves(quantized_layer(WeightSpec(4), ActSpec(8, group_size=32))[0])  # llama.cpp's
    assert not KernelLinear.serves(quantized_layer(WeightSpec(8, None, False), ActSpec(8))[0])  # codes +-255
    with pytest.raises(ValueError, match="do not serve"):
        KernelLinear(quantized_layer(WeightSpec(4), ActSpec(8, group_size=32))[0], None)


def test_swap_fuses_the_online_hadamard_into_the_down_projection(tiny_dirs):
    sampling = LLaDASampling(gen_length=8, block_length=4, steps=8)
    prompts = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
    model = load_denoiser(tiny_dirs["llada"])
    artifact = quantize(model, preset("quarot", abits=4, n_prompts=4), prompts, sampling)
    student = artifact.apply(copy.deepcopy(model))
    kernels_model = artifact.apply(copy.deepcopy(model))
    assert swap_kernel_linears(kernels_model) == len(artifact.layers)
    layout = model.rotation_layout()
    for block in kernels_model.blocks:
        assert isinstance(block.get_submodule(layout.ffn_down_input), nn.Identity)
        assert block.get_submodule(layout.ffn_down).hadamard_block > 1
    assert isinstance(student.blocks[0].get_submodule(layout.ffn_down_input), OnlineHadamard)
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(kernels_model(ids), student(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method,abits,group_size", [("quarot", 4, None), ("rtn", 16, 64)])
def test_bundled_model_decides_as_the_fake_quant_student(method, abits, group_size, monkeypatch):
    """W4A4 with the rotation (integer GEMMs, packed weights, the fused Hadamard) and W4A16 in groups (the
    dequantize-GEMM): >= 99.9 % of the committed decisions along the teacher's trajectories agree.

    The kernels' references run here (the interpreter would take hours over these forwards); the kernels
    are held to the references in tests/kernels, and to the student on the tiny model above."""
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
    teacher = load_denoiser(bundled_model())
    sampling = LLaDASampling(gen_length=32, block_length=8, steps=32)  # the bench's schedule
    calib = torch.randint(3, 4000, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    artifact = quantize(teacher, preset(method, abits=abits, group_size=group_size, n_prompts=8), calib, sampling)
    prompts = torch.randint(3, 4000, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    references = record_runs(teacher, prompts, sampling, teacher.spec, batch_size=8)
    backend = TritonBackend(copy.deepcopy(teacher), artifact)
    assert backend.swapped == len(artifact.layers)
    agreement = decision_agreement(backend, artifact.apply(copy.deepcopy(teacher)), references, sampling, teacher.spec)
    assert agreement["committed_decisions"] >= 8 * sampling.gen_length
    assert agreement["decision_agreement"] >= 0.999, agreement


def test_cli_generates_measures_and_times_the_triton_student(tiny_dirs, tmp_path, capsys, monkeypatch):
    """The verbs' wiring, on the kernels' references (the interpreter takes minutes over parity's forwards)."""
    from faircalib.cli import main

    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")

    model = str(tiny_dirs["bert"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A B C D\nQ R S\nE F G H I\n")
    artifact = tmp_path / "w4a4"
    assert main(["calibrate", "--model", model, "--method", "rtn", "--abits", "4", "--calib-prompts", str(prompts),
                 "--gen-length", "6", "--steps", "6", "--out", str(artifact), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()

    def run(*argv):
        code = main([*argv, "--model", model])
        return code, capsys.readouterr()

    code, out = run("generate", "--backend", "triton", "--artifact", str(artifact), "--prompt", "A B", "--json")
    assert code == 0 and len(json.loads(out.out)["generated_ids"]) == 6
    code, out = run("parity", "--backend", "triton", "--artifact", str(artifact), "--prompts", str(prompts), "--json",
                    "--quiet")  # fmt: skip
    report = json.loads(out.out)
    assert code == 0 and report["backend"] == "triton" and report["vs_fake_quant"]["decision_agreement"] == 1.0
    latency = tmp_path / "latency.json"
    code, out = run("latency", "--artifact", str(artifact), "--repeats", "2", "--batch", "2", "--out", str(latency))
    rows = json.loads(latency.read_text())["rows"]
    assert code == 0 and [r["backend"] for r in rows] == ["torch-fp32", "torch-W4A4", "triton-W4A4"]
    assert all(r["seq"] == 16 + 6 and r["block_length"] == 6 and r["median_ms"] > 0 for r in rows)
    code, out = run("generate", "--backend", "triton", "--prompt", "A B")
    assert code == 2 and "give its --artifact" in out.err


@pytest.mark.slow
def test_gpu_kernel_benchmark_runs_at_tiny_shapes(tmp_path):
    """benchmarks/gpu_kernels.py, prepared here for a GPU session, at tiny shapes (the references off a GPU)."""
    root = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = [sys.executable, str(root / "benchmarks" / "gpu_kernels.py"), "--smoke", "--repeats", "1"]
    subprocess.run([*script, "--out", str(tmp_path)], check=True, env=env, capture_output=True)
    gemm = json.loads((tmp_path / "gemm.json").read_text())
    assert all(row["int_gemm_exact"] for row in gemm if "int_gemm_exact" in row)
    steps = json.loads((tmp_path / "step.json").read_text())
    assert {row["model"] for row in steps} == {"bf16", "W8A8", "W4A8", "W4A4", "W4A16"}
    assert all(row["step_ms"] > 0 and row["profile"] for row in steps)
