"""llama.cpp as a runtime: its logits and greedy decisions against PyTorch's, and its own diffusion CLI."""

import copy
import json
import subprocess

import pytest
import torch

from faircalib.api import calibrate_to, export
from faircalib.calib.config import preset
from faircalib.calib.student import linear_widths
from faircalib.cli import main
from faircalib.exporter.profiles import profile
from faircalib.models import load_denoiser
from faircalib.runtime.llamacpp import LlamaCppBackend, diffusion_cli
from faircalib.sampling import DreamSampling, LLaDASampling, generate, record_runs
from faircalib.sampling.parity import decision_agreement
from faircalib.zoo import model_dir

IDS = torch.tensor([[5, 9, 17, 3, 8, 95, 95, 95, 95, 11], [7, 7, 95, 95, 95, 95, 95, 95, 2, 3]])


@pytest.fixture(scope="module")
def f32_bundles(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {family: export(load_denoiser(tiny_dirs[family]), None, "gguf-f32", root / family)
            for family in ("llada", "dream")}  # fmt: skip


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_llama_cpp_logits_match_pytorch(tiny_dirs, f32_bundles, family):
    model, backend = load_denoiser(tiny_dirs[family]), LlamaCppBackend(f32_bundles[family], threads=1)
    with torch.no_grad():
        expected = model(IDS)
    logits = backend(IDS)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)  # F32 weights: float summation order only
    assert torch.equal(backend(IDS[1:]), logits[1:])  # a sequence's logits do not depend on its batch


@pytest.mark.parametrize(
    "family,sampling",
    [
        ("llada", LLaDASampling(gen_length=16, block_length=8, steps=16)),
        ("llada", LLaDASampling(gen_length=16, block_length=16, steps=8, remasking="left_to_right")),
        ("dream", DreamSampling(gen_length=16, steps=16, alg="maskgit_plus")),
        ("dream", DreamSampling(gen_length=16, steps=8, alg="entropy")),
        ("dream", DreamSampling(gen_length=16, steps=16, alg="topk_margin")),
    ],
    ids=["llada-blocks", "llada-left-to-right", "dream-maskgit", "dream-entropy", "dream-margin"],
)
def test_greedy_generation_through_llama_cpp_is_token_exact(tiny_dirs, f32_bundles, family, sampling):
    model, backend = load_denoiser(tiny_dirs[family]), LlamaCppBackend(f32_bundles[family], threads=1)
    prompt = torch.tensor([[5, 9, 17, 3], [7, 7, 40, 22]])
    expected = generate(model, prompt, sampling, model.spec)
    assert torch.equal(generate(backend, prompt, sampling, model.spec).tokens, expected.tokens)


@pytest.mark.slow
def test_llama_diffusion_cli_writes_what_faircalib_generate_writes(tmp_path, capsys):
    bundle = export(load_denoiser(model_dir()), None, "gguf-f16", tmp_path / "bundle")
    prompt, schedule = "The history of the city", ["--gen-length", "32", "--block-length", "32", "--steps", "32"]
    code = main(["generate", "--backend", "llamacpp", "--bundle", str(bundle), "--prompt", prompt, *schedule,
                 "--remasking", "left_to_right", "--json", "--quiet", "--threads", "1"])  # fmt: skip
    ours = json.loads(capsys.readouterr().out)
    binary, env = diffusion_cli()
    length = str(len(ours["prompt_ids"]) + 32)  # llama.cpp's -ub: prompt and generation together, one block
    cli = subprocess.run(
        [str(binary), "-m", str(bundle / "model.gguf"), "-p", prompt, "-ub", length, "-c", length, "-b", length,
         "--diffusion-block-length", length, "--diffusion-steps", "32", "--temp", "0", "--top-k", "1", "--seed", "0",
         "-t", "1", "-fa", "off", "--no-log-prefix", "--no-log-timestamps", "--log-colors", "off"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert code == 0 and cli.returncode == 0, cli.stderr[-2000:]
    # the CLI prints its text on stderr after its timing line, framed by one newline each side
    text = cli.stderr.split("sampling time per step")[1].split("\n", 1)[1][1:-1]
    assert text == ours["text"] and len(ours["generated_ids"]) == 32


@pytest.mark.slow
def test_a_fair_calib_q4_0_student_in_llama_cpp_decides_as_its_pytorch_twin(tmp_path):
    """llama.cpp's Q4_0 products (int8 activations per block of 32) are what the fake-quant student computes."""
    teacher = load_denoiser(model_dir())
    sampling = LLaDASampling(gen_length=32, block_length=8, steps=32)
    fields = profile("gguf-q4_0").calibration_fields(linear_widths(teacher))
    cfg = preset("fair", n_prompts=8, states_per_prompt=8, **fields)
    from faircalib.data import calibration_data, evaluation_data
    from faircalib.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir())
    calib = calibration_data(tokenizer, 8, None, 32, None, text=False)
    artifact = calibrate_to(tmp_path / "art", copy.deepcopy(teacher), cfg, calib.prompts, sampling)
    bundle = export(teacher, artifact, "gguf-q4_0", tmp_path / "bundle")
    prompts = evaluation_data(tokenizer, 16, None, 32, None).prompts
    references = record_runs(teacher, prompts, sampling, teacher.spec)
    agreement = decision_agreement(LlamaCppBackend(bundle, threads=1), artifact.apply(copy.deepcopy(teacher)),
                                   references, sampling, teacher.spec)  # fmt: skip
    assert agreement["decision_agreement"] >= 0.995, agreement
