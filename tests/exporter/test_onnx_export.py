"""Export to ONNX: graph structure per profile, ONNX Runtime against the PyTorch fake-quant student,
external data, and refusals of artifacts a profile cannot express."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from faircalib.api import calibrate_to
from faircalib.calib.artifact import QuantArtifact
from faircalib.calib.config import QuantConfig, preset
from faircalib.errors import ConfigError
from faircalib.exporter.onnx_export import export_bundle
from faircalib.exporter.schedule_file import read_schedule
from faircalib.exporter.trt_rules import check_tensorrt
from faircalib.models import load_denoiser
from faircalib.sampling import LLaDASampling

pytestmark = pytest.mark.slow  # each export traces the model (seconds)

SAMPLING = LLaDASampling(gen_length=8, block_length=8, steps=8)
PROMPTS = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
# ORT and PyTorch sum the same float32 products in different orders: logits agree to ~1e-7 here.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    configs = {
        "sym-g64": preset("gptq", group_size=64),
        "asym-g16": preset("gptq", group_size=16, w_symmetric=False),
        # learned on top of the Hadamard, with block transforms (norm weights no longer ones): QuaRot's GPTQ with
        # a learned rotation, which no preset is
        "rotated-a4": QuantConfig(method="custom", abits=4, rotate=True, rotation_steps=10, block_transforms=True),
        "asym-g16-a4": preset("gptq", group_size=16, w_symmetric=False, abits=4, a_symmetric=False),
        "w8a8-static": preset("gptq", wbits=8, abits=8, a_static=True),
        # mixed precision: a few linears kept at 8-bit weights (and 8-bit inputs where the rest take 4)
        "promoted-a4": QuantConfig(method="custom", abits=4, rotate=True, promote_budget=30, promote_by="hessian"),
        "promoted-g64": preset("gptq", group_size=64, promote_budget=30, promote_by="hessian"),
    }
    for name, cfg in configs.items():
        calibrate_to(root / name, load_denoiser(tiny_dirs["llada"]), cfg, PROMPTS, SAMPLING)
    return {name: root / name for name in configs}


def export(tiny_dirs, artifact_dir, profile_name, out, **kwargs):
    """``export_bundle`` of the tiny LLaDA and the artifact in ``artifact_dir`` (None: no artifact)."""
    artifact = QuantArtifact.load(artifact_dir) if artifact_dir is not None else None
    return export_bundle(load_denoiser(tiny_dirs["llada"]), artifact, profile_name, out, **kwargs)


def student_of(teacher, artifact_dir):
    """The fake-quant student of the artifact in ``artifact_dir``; ``teacher`` is left as it is."""
    return QuantArtifact.load(artifact_dir).apply(copy.deepcopy(teacher))


def ort_session(path):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact, no int8 activations
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def initializers(path):
    model = onnx.load(str(path))
    return {i.name: i for i in model.graph.initializer}, model


def test_trt_w4a16_graph(tiny_dirs, artifacts, tmp_path):
    out = export(tiny_dirs, artifacts["sym-g64"], "trt-w4a16", tmp_path / "trt")
    inits, model = initializers(out / "model.onnx")
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14  # 7 linears x 2 blocks
    for node in dq:
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT4
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT16
        assert len(node.input) == 2  # no zero point
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["block_size"] == 64
    assert check_tensorrt(model) == []
    assert read_schedule(out).sampling == SAMPLING
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"] == "trt-w4a16" and manifest["opset"] == 21


@pytest.mark.parametrize(
    "name,profile_name",
    [
        ("asym-g16", "ort-w4a16"),
        ("rotated-a4", "ort-w4a4"),
        ("asym-g16-a4", "ort-w4a4"),
        ("w8a8-static", "ort-w8a8"),
        ("promoted-a4", "ort-w4a4"),
        ("promoted-g64", "ort-w4a16"),
    ],
)
def test_ort_matches_the_fake_quant_student(tiny_dirs, artifacts, tmp_path, name, profile_name):
    out = export(tiny_dirs, artifacts[name], profile_name, tmp_path / name)
    student = student_of(load_denoiser(tiny_dirs["llada"]), artifacts[name])
    session = ort_session(out / "model.onnx")
    for shape in ((1, 9), (3, 17)):  # dynamic batch and sequence
        ids = torch.randint(0, 95, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        want = student(ids).detach().numpy()
        assert np.abs(got - want).max() < LOGIT_TOLERANCE
    if name.startswith("asym"):
        inits, model = initializers(out / "model.onnx")
        zero_points = [n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert zero_points and all(inits[z].data_type == onnx.TensorProto.UINT4 for z in zero_points)
    if name.startswith("promoted"):  # each linear's initializer in its own width
        promoted = set(QuantArtifact.load(artifacts[name]).manifest["promotion"]["promoted"])
        inits, model = initializers(out / "model.onnx")
        kinds = [inits[n.input[0]].data_type for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits]  # fmt: skip
        assert kinds.count(onnx.TensorProto.INT8) == len(promoted) > 0
        assert kinds.count(onnx.TensorProto.INT4) == 14 - len(promoted)


def test_trt_w8a8_graph(tiny_dirs, artifacts, tmp_path):
    """TensorRT's INT8 pattern: x -> Q -> DQ -> MatMul <- DQ <- INT8 W, scales constant and in fp16."""
    out = export(tiny_dirs, artifacts["w8a8-static"], "trt-w8a8", tmp_path / "w8")
    inits, model = initializers(out / "model.onnx")
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 14
    for node in weight_dq:
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT8 and len(node.input) == 2
        assert list(inits[node.input[1]].dims) == [inits[node.input[0]].dims[1]]  # per output channel
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT16
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 14  # a dedicated pair per linear, though q/k/v (and gate/up) read one tensor
    assert len({n.input[1] for n in quantizers}) == 14
    for node in quantizers:
        assert list(inits[node.input[1]].dims) == [] and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert check_tensorrt(model) == []
    student = student_of(load_denoiser(tiny_dirs["llada"]), artifacts["w8a8-static"])
    ids = torch.randint(0, 95, (2, 11), generator=torch.Generator().manual_seed(0))
    got = ort_session(out / "model.onnx").run(None, {"input_ids": ids.numpy()})[0]
    want = student(ids).detach().numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # fp16 activations against the fp32 student


def test_onnx_runtime_runs_every_w8a8_linear_as_an_integer_gemm(tiny_dirs, artifacts, tmp_path):
    """What dedicated Q/DQ pairs are for: ORT fuses DQ -> MatMul into MatMulIntegerToFloat for all 14."""
    out = export(tiny_dirs, artifacts["w8a8-static"], "ort-w8a8", tmp_path / "w8")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in optimized.graph.node) == 14


def test_external_data_for_large_weights(tiny_dirs, artifacts, tmp_path):
    out = export(tiny_dirs, artifacts["asym-g16"], "ort-w4a16", tmp_path / "ext", external_data_threshold=0)
    assert (out / "model.onnx.data").is_file()
    assert json.loads((out / "manifest.json").read_text())["external_data"]
    ids = torch.tensor([[5, 6, 7, 95, 95]])
    assert ort_session(out / "model.onnx").run(None, {"input_ids": ids.numpy()})[0].shape == (1, 5, 96)


@pytest.mark.parametrize(
    "name,profile_name,message",
    [
        ("asym-g16", "trt-w4a16", "asymmetric weights"),
        ("rotated-a4", "trt-w4a16", "4-bit activations"),
        ("sym-g64", "ort-w4a4", "16-bit activations"),
        ("rotated-a4", "trt-w8a8", "4-bit weights"),
        ("w8a8-static", "ort-w4a8", "8-bit weights"),
        ("promoted-g64", "trt-w4a16", "linears kept at 8-bit weights by --promote-budget"),
    ],
)
def test_profiles_refuse_what_they_cannot_express(tiny_dirs, artifacts, tmp_path, name, profile_name, message):
    with pytest.raises(ConfigError, match=message):
        export(tiny_dirs, artifacts[name], profile_name, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_profile(tiny_dirs, artifacts, tmp_path):
    with pytest.raises(ConfigError, match="unknown export profile"):
        export(tiny_dirs, artifacts["sym-g64"], "trt-w3a3", tmp_path / "x")


def test_export_cli_then_check_onnx(tiny_dirs, artifacts, tmp_path, capsys):
    from faircalib.cli import main

    out = tmp_path / "bundle"
    argv = ["export", "--model", str(tiny_dirs["llada"]), "--artifact", str(artifacts["sym-g64"]),
            "--profile", "trt-w4a16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(["check-onnx", str(out / "model.onnx")]) == 0
    assert main([*argv[:-2], "--out", str(tmp_path / "b2"), "--profile", "ort-w4a4"]) == 2
    assert "cannot express" in capsys.readouterr().err


def test_generate_and_parity_on_onnx_runtime(tiny_dirs, artifacts, tmp_path, capsys):
    """The exported student, driven by its schedule.json on ORT, against the teacher and the fake-quant student."""
    from faircalib.cli import main
    from faircalib.runtime.backends import OrtBackend
    from faircalib.runtime.driver import run_bundle

    out = export(tiny_dirs, artifacts["rotated-a4"], "ort-w4a4", tmp_path / "a4")
    prompt = torch.tensor([[5, 6, 7, 8]])
    student = student_of(load_denoiser(tiny_dirs["llada"]), artifacts["rotated-a4"])
    assert torch.equal(run_bundle(OrtBackend(out), out, prompt).tokens, run_bundle(student, out, prompt).tokens)

    assert (
        main(["generate", "--backend", "ort", "--onnx", str(out), "--prompt-ids", "5,6,7,8", "--json", "--quiet"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["backend"] == "ort"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\\n")  # the tiny model has no tokenizer: parity needs prompts it can read
    code = main([
        "parity", "--backend", "ort", "--onnx", str(out), "--model", str(tiny_dirs["llada"]),
        "--artifact", str(artifacts["rotated-a4"]), "--prompts", str(prompts), "--json", "--quiet",
    ])  # fmt: skip
    assert code == 2 and "no tokenizer" in capsys.readouterr().err


def test_exported_w4a4_student_makes_the_fake_quant_students_decisions(tiny_dirs, artifacts, tmp_path):
    """Issue 5's bar: >= 99 % of committed decisions along the teacher trajectory agree."""
    from faircalib.runtime.backends import OrtBackend
    from faircalib.sampling import record_runs
    from faircalib.sampling.parity import decision_agreement, parity_report

    out = export(tiny_dirs, artifacts["rotated-a4"], "ort-w4a4", tmp_path / "a4")
    teacher = load_denoiser(tiny_dirs["llada"])
    student = student_of(teacher, artifacts["rotated-a4"])
    prompts = torch.randint(3, 90, (16, 6), generator=torch.Generator().manual_seed(3)).tolist()
    references = record_runs(teacher, prompts, SAMPLING, teacher.spec)
    agreement = decision_agreement(OrtBackend(out), student, references, SAMPLING, teacher.spec)
    assert agreement["committed_decisions"] == 16 * SAMPLING.gen_length
    assert agreement["decision_agreement"] >= 0.99
    report = parity_report(teacher, OrtBackend(out), prompts, SAMPLING, teacher.spec, references=references)
    assert report == parity_report(teacher, student, prompts, SAMPLING, teacher.spec, references=references) or (
        abs(
            report["frontier_flip_rate"]
            - parity_report(teacher, student, prompts, SAMPLING, teacher.spec)["frontier_flip_rate"]
        )
        < 0.02
    )


def test_fp32_export_and_latency(tiny_dirs, artifacts, tmp_path, capsys):
    from faircalib.cli import main
    from faircalib.runtime.backends import OrtBackend

    out = export(tiny_dirs, None, "ort-fp32", tmp_path / "fp32")
    teacher = load_denoiser(tiny_dirs["llada"])
    ids = torch.tensor([[5, 6, 7, 95, 95, 95]])
    assert np.abs(OrtBackend(out)(ids).numpy() - teacher(ids).detach().numpy()).max() < LOGIT_TOLERANCE
    with pytest.raises(ConfigError, match="drop the artifact"):
        export(tiny_dirs, artifacts["sym-g64"], "ort-fp32", tmp_path / "x")
    with pytest.raises(ConfigError, match="give its artifact"):
        export(tiny_dirs, None, "ort-w4a16", tmp_path / "x")
    report = tmp_path / "latency.json"
    argv = ["latency", "--model", str(tiny_dirs["llada"]), "--onnx", str(out), "--repeats", "3", "--out", str(report)]
    assert main(argv) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch-fp32", "ort-fp32"] and all(r["median_ms"] > 0 for r in rows)


def test_static_and_per_token_activation_artifacts_go_to_their_own_profiles():
    from faircalib.exporter.profiles import profile

    dynamic = QuantArtifact(preset("gptq", wbits=8, abits=8), {})
    static = QuantArtifact(preset("gptq", wbits=8, abits=8, a_static=True), {})
    with pytest.raises(ConfigError, match="static per-tensor"):
        profile("trt-w8a8").check(dynamic)
    with pytest.raises(ConfigError, match="group size 64 .*per-channel"):
        profile("trt-w8a8").check(QuantArtifact(preset("gptq", wbits=8, abits=8, a_static=True, group_size=64), {}))
    profile("trt-w8a8").check(static)
    profile("ort-w8a8").check(static)


def test_an_export_made_of_the_model_itself_writes_the_same_file_and_a_kept_model_is_untouched(
    tiny_dirs, artifacts, tmp_path
):
    model = load_denoiser(tiny_dirs["llada"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = export_bundle(model, QuantArtifact.load(artifacts["rotated-a4"]), "ort-w4a4", tmp_path / "kept")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    consumed = export_bundle(model, QuantArtifact.load(artifacts["rotated-a4"]), "ort-w4a4", tmp_path / "consumed",
                             consume=True)  # fmt: skip
    assert (kept / "model.onnx").read_bytes() == (consumed / "model.onnx").read_bytes()


def test_a_traced_student_holds_no_weights_even_when_cast(tiny_dirs, artifacts):
    from faircalib.calib.linear import QuantLinear

    student = QuantArtifact.load(artifacts["sym-g64"]).apply(load_denoiser(tiny_dirs["llada"]), placeholders=True)
    for dtype in (torch.float32, torch.float16):
        layers = [m for m in student.to(dtype).modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.weight.dtype == dtype and m.weight.untyped_storage().nbytes() == m.weight.element_size()
                              for m in layers)  # fmt: skip


# A one-block LLaDA with the real 126,464-token vocabulary, 2.4 GB in fp32: its export, in a fresh process, prints
# the process's peak resident set.
LARGE_EXPORT = """
import sys, torch
from pathlib import Path
from faircalib.calib.runner import host_peak_mb
from faircalib.exporter.onnx_export import export_bundle
from faircalib.models import load_denoiser
from faircalib.models.llada import LLaDA
from faircalib.models.tiny import tiny_llada_config

out = Path(sys.argv[1])
cfg = tiny_llada_config(d_model=2304, n_heads=18, n_kv_heads=18, mlp_hidden_size=64, n_layers=1, vocab_size=126464,
                        embedding_size=126464, mask_token_id=126336, eos_token_id=126081, eot_token_id=126348)
model = LLaDA(cfg)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained(out / "ckpt", None)
del model
export_bundle(load_denoiser(out / "ckpt"), None, "ort-fp32", out / "bundle")
print(host_peak_mb())
"""


@pytest.mark.slow
def test_an_export_over_2_gib_writes_external_data_the_checker_passes(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LARGE_EXPORT, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = tmp_path / "bundle"
    assert (bundle / "model.onnx.data").stat().st_size > 2**31
    onnx.checker.check_model(str(bundle / "model.onnx"), full_check=True)
    peak = float(done.stdout.split()[-1]) * 2**20
    checkpoint = sum(path.stat().st_size for path in (tmp_path / "ckpt").glob("*.safetensors"))
    assert peak < 16 * 2**30  # well inside the CI machine's 24 GiB
    assert peak <= 1.5 * (checkpoint + sum(path.stat().st_size for path in bundle.iterdir()))  # issue 28's bound
