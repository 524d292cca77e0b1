import json
import subprocess
import sys

import pytest

from faircalib.cli import main
from faircalib.models.tiny import write_tiny_checkpoint


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_on_ids(capsys, tiny_dirs):
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "3,4,5",
        "--gen-length", "8", "--block-length", "4", "--steps", "4", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out)
    assert payload["prompt_ids"] == [3, 4, 5]
    assert len(payload["generated_ids"]) == 8
    assert payload["text"] is None  # no tokenizer files in this checkpoint
    assert payload["sampling"]["block_length"] == 4 and payload["family"] == "llada"


def test_generate_text_with_tokenizer(capsys, tiny_dirs):
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_dirs["bert"]), "--prompt", "A B C", "--gen-length", "6",
        "--steps", "3", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out)
    assert payload["prompt_ids"] == [2, 5, 6, 7]  # [CLS] A B C, the closing [SEP] dropped
    assert isinstance(payload["text"], str)


def test_dream_defaults_follow_reference(capsys, tiny_dirs):
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_dirs["dream"]), "--prompt-ids", "1,2", "--gen-length", "8",
        "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    sampling = json.loads(out)["sampling"]
    assert sampling["alg"] == "origin" and sampling["eps"] == 1e-3 and sampling["steps"] == 8


def test_same_seed_same_output(capsys, tiny_dirs):
    argv = ["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "3,4", "--gen-length", "8",
            "--steps", "8", "--temperature", "1.0", "--json", "--quiet", "--seed", "4"]  # fmt: skip
    first = run_cli(capsys, *argv)[1]
    assert run_cli(capsys, *argv)[1] == first


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt-ids", "1", "--gen-length", "10", "--block-length", "4"], "not a multiple of block_length"),
        (["--prompt-ids", "1", "--alg", "entropy"], "not options of the llada sampler"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt", "hello"], "no tokenizer files"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tiny_dirs, extra, message):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_dirs["llada"]), "--quiet", *extra)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_missing_model_dir_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "faircalib", "generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "model directory not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def bert_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("A B C D\nQ R S\n\nE F G H I\nK L M N\n")
    return path


@pytest.fixture(scope="module")
def bert_artifact(tiny_dirs, bert_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "fair"
    code = main([
        "calibrate", "--model", str(tiny_dirs["bert"]), "--method", "fair", "--calib-prompts", str(bert_prompts),
        "--recon-steps", "3", "--states-per-prompt", "2", "--gen-length", "6", "--steps", "6", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    assert code == 0
    return out


def test_calibrate_writes_an_artifact_from_flags(bert_artifact):
    manifest = json.loads((bert_artifact / "manifest.json").read_text())
    assert manifest["method"] == "fair" and manifest["config"]["recon_steps"] == 3
    assert manifest["sampling"]["gen_length"] == 6
    assert manifest["calibration_data"]["prompts"] == 4  # the empty line is skipped


def test_parity_json_reports_every_metric(capsys, tiny_dirs, bert_artifact, bert_prompts):
    code, out, _ = run_cli(
        capsys, "parity", "--model", str(tiny_dirs["bert"]), "--artifact", str(bert_artifact),
        "--prompts", str(bert_prompts), "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    for name in ("frontier_flip_rate", "commit_set_disagreement", "frontier_write_error", "post_commit_mismatch",
                 "post_commit_mismatch_forced", "teacher_divergence", "exact_match"):  # fmt: skip
        assert 0.0 <= report[name] <= 1.0
    assert 0.0 <= report["post_commit_mismatch_teacher"] <= 1.0
    assert report["decision_margin_error"] >= 0.0  # nats, unbounded
    assert report["sampling"]["gen_length"] == 6  # the artifact's deployment schedule by default
    assert len(report["curves"]["frontier_flip_rate"]) == 6


def test_parity_against_the_wrong_model_fails_cleanly(capsys, tiny_dirs, bert_artifact, bert_prompts, tmp_path):
    other = write_tiny_checkpoint("bert", tmp_path / "other", seed=5)
    code, _, err = run_cli(
        capsys, "parity", "--model", str(other), "--artifact", str(bert_artifact), "--prompts", str(bert_prompts),
    )  # fmt: skip
    assert code == 2 and "calibrated for" in err


def test_calibrate_without_tokenizer_or_prompts_fails_cleanly(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "calibrate", "--model", str(tiny_dirs["llada"]), "--out", str(tmp_path / "a"))
    assert code == 2 and "pass --calib-prompts" in err


def test_calibrate_rejects_bad_config(capsys, tiny_dirs, bert_prompts, tmp_path):
    code, _, err = run_cli(
        capsys, "calibrate", "--model", str(tiny_dirs["bert"]), "--calib-prompts", str(bert_prompts),
        "--wbits", "5", "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert code == 2 and "weight bits must be" in err


def test_parity_gate_exit_codes_and_the_bundle_records_what_it_passed(capsys, tiny_dirs, bert_artifact, bert_prompts,
                                                                      tmp_path):  # fmt: skip
    argv = ["parity", "--model", str(tiny_dirs["bert"]), "--artifact", str(bert_artifact), "--prompts",
            str(bert_prompts), "--json", "--quiet"]  # fmt: skip
    assert main([*argv, "--gate", "frontier_flip_rate<=1,exact_match>=0"]) == 0
    passed = capsys.readouterr().out
    assert json.loads(passed)["gate"] == {"rules": "frontier_flip_rate<=1,exact_match>=0", "passed": True,
                                          "failures": []}  # fmt: skip
    assert main([*argv, "--gate", "exact_match>=1.01"]) == 1
    err = capsys.readouterr().err
    assert err.count("faircalib: gate failed: exact_match") == 1 and "is not >= 1.01" in err
    assert main([*argv, "--gate", "exact_match=1"]) == 2  # malformed: refused before any work
    (tmp_path / "report.json").write_text(passed)
    export = ["export", "--model", str(tiny_dirs["bert"]), "--artifact", str(bert_artifact), "--profile", "ort-w4a16"]
    assert main([*export, "--out", str(tmp_path / "bundle"), "--parity-report", str(tmp_path / "report.json")]) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["parity"]["gate"]["passed"] and "curves" not in manifest["parity"]
    assert manifest["parity"]["frontier_flip_rate"] == json.loads(passed)["frontier_flip_rate"]
