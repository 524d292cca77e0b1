import json
import subprocess
import sys

import pytest

from faircalib.cli import main


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
